"""How the commands fit together: the stage table (`stages`), every command's parser
(`cli`), the plan and budget, launchers (SLURM), the progress line of parallel training.
The top library floor, under the commands at the repository root.
"""
