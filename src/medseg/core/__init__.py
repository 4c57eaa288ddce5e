"""The ground floor: errors and exit codes, safe file writing, progress, optional packages,
the version. Imports nothing else of medseg, and nothing heavier than the standard library and
tqdm, so the command line can start from here without PyTorch."""
