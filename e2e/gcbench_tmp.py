import gc, sys, runpy
if sys.argv[1] == "freeze":
    import slam.bench.decode as d
    orig = d.bench_engine
    def wrapped(*a, **k):
        gc.collect(); gc.freeze()
        return orig(*a, **k)
    d.bench_engine = wrapped
elif sys.argv[1] == "off":
    gc.disable()
argv = sys.argv[2:]
from slam.cli import main
sys.exit(main(argv))
