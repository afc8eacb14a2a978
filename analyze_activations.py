"""The analysis script of the pipeline actcap grew from, on top of ``actcap analyze``.

python analyze_activations.py --file runs/demo/samples/mc-01.safetensors
python analyze_activations.py --directory runs/demo
python analyze_activations.py --compare a.safetensors b.safetensors
"""

from actcap.cli.analyze_cmd import analyze
from actcap.cli.common import one_line_warnings

if __name__ == "__main__":
    one_line_warnings()
    analyze(prog_name="analyze_activations.py")
