"""The analysis script of the pipeline actcap grew from, on top of ``actcap analyze``.

python analyze_activations.py --file runs/demo/samples/mc-01.safetensors
python analyze_activations.py --directory runs/demo
python analyze_activations.py --compare a.safetensors b.safetensors
"""

from actcap.cli.analyze_cmd import analyze

if __name__ == "__main__":
    analyze(prog_name="analyze_activations.py")
