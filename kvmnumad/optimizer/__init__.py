"""The NUMA optimizer: what each VM's memory and vCPUs look like on the host
(samples), why each placement was made (explanations), and what would make
it better (suggestions).  The decisions are pure functions over samples;
reading /proc and /sys (probe.py) and the timer (timer.py) are the edges."""
