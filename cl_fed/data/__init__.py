"""Speech data: offline synthetic factory speech, manifests, site x stage streams, audio I/O."""
