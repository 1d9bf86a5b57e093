"""sera-openrlhf: SeRA (Self-Reviewing and Alignment) for OpenRLHF.

Core math (losses, rewards, selection, bootstrap) imports with torch alone; the OpenRLHF adapter
(`sera_openrlhf.openrlhf_adapter`) is the only place that imports openrlhf/deepspeed.
"""

__version__ = "0.1.0"
