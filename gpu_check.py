"""`python gpu_check.py` (`make gpu-check`): on a machine with CUDA, run the tests that use it,
the demo with bf16 autocast, and the GPU benchmarks, and print the figures."""

import subprocess
import sys

import torch


def run(title, command):
    """Run one step, say whether it passed; returns its exit status."""
    print(f"\n=== {title}: {' '.join(command)}", flush=True)
    status = subprocess.run(command).returncode
    print(f"=== {title}: {'passed' if status == 0 else f'FAILED (exit {status})'}", flush=True)
    return status


def main():
    """Every check in turn; exit status 1 if any failed, 2 without CUDA."""
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (torch.cuda.is_available() is False)")
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"bf16 {'supported' if torch.cuda.is_bf16_supported() else 'not supported'}")  # fmt: skip
    py = sys.executable
    statuses = [
        run("tests on CUDA", [py, "-m", "pytest", "-q", "tests/test_cuda.py", "tests/test_decoding.py"]),
        # The demo picks CUDA and bf16 autocast by itself (device="auto", amp="auto").
        run("demo (CUDA, bf16 autocast)", [py, "demo.py", "--output-dir", "outputs/gpu-check"]),
        # Peak, decoder training and decoding FLOP/s, a COCO-scale epoch, ResNet-50 images/s.
        run("benchmarks on the GPU", [py, "-m", "bench", "--only", "limit", "--device", "cuda",
                                      "--json", "bench/results_gpu.json"]),
    ]  # fmt: skip
    return int(any(statuses))


if __name__ == "__main__":
    sys.exit(main())
