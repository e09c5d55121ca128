"""Launchers: N local processes (launch.local), TPU VM pods (launch/tpu_pod.sh), SLURM GPU clusters
(launch/slurm.sbatch), and sweep expansion (launch.sweep). Standard library only; no clipjax imports.
"""
