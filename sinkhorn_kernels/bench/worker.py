"""Entry point of one isolated measurement: `python -m sinkhorn_kernels.bench.worker '<json spec>'`."""
import json
import sys

from .measure import measure

if __name__ == '__main__':
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
