"""Upper bounds on sizes from the command line and bench.toml: far above any real use, low enough that
a typo fails at once instead of running for days or exhausting memory."""

MAX_BATCH = 65_536        # images per sampling, decoding or feature batch
MAX_RESOLUTION = 8_192    # pixels per side of a dataset's or a feature file's images
MAX_REPEATS = 1_000       # timing: warm-up batches and timed batches
MAX_KID_SUBSETS = 10_000
MAX_SEED = 2 ** 32 - 1    # numpy's RandomState (KID subsets) takes seeds below 2**32
MAX_THREADS = 1_024
