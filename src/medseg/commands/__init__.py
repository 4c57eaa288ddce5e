"""One module per command the command line and the API offer: train's setup lives in
`medseg.engine`, and these files put the floors below together for one job each."""
