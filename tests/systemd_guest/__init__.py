"""A guest whose PID 1 is systemd, where the project's .deb is installed and its unit checked.

``python -m tests.systemd_guest`` (``make test-systemd``); see launcher.py.
"""
