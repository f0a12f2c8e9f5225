"""Benchmark the λ_max estimator against pyhessian on a CIFAR-ResNet-20, side by side.

Prints ratios measured in one run (absolute times on a shared machine mean little):

- time to reach 1e-3 relative error against a tightly converged reference, for our
  Lanczos from a cold start and warm-started from the previous eigenvector after a
  few training steps, each divided by pyhessian's time to the same accuracy;
- time of one Hessian-vector product divided by one forward+backward, per path;
- peak memory of a solve (resident set size growth, each in a fresh process),
  ours divided by pyhessian's.

Both estimators see the same 128-image batch with BatchNorm in eval mode, the only
mode pyhessian supports. Usage:

    python benchmarks/sharpness.py [--data-root DIR_WITH_cifar-10-batches-py] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dynamics.data import TensorLoader, load_cifar10_dataset  # noqa: E402
from dynamics.models import CifarResNet  # noqa: E402
from probes.hessian import HessianOperator, lanczos, solve_mode  # noqa: E402

ACCURACY = 1e-3


def make_problem(data_root: str | None, batch: int = 128, seed: int = 0):
    """Return a ResNet-20 trained for a few steps and a fixed batch (real CIFAR images when given)."""
    torch.manual_seed(seed)
    if data_root:
        dataset = load_cifar10_dataset(data_root)
        loader = TensorLoader(dataset.train_x, dataset.train_y, batch, shuffle=True, augment=True,
                              mean=dataset.mean, std=dataset.std, seed=seed)
        batches = iter(loader)
        inputs, targets = next(batches)
        train = [next(batches) for _ in range(20)]
    else:
        inputs, targets = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        train = [(torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))) for _ in range(20)]
    model = CifarResNet(20)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for x, y in train[:15]:  # leave the random initialization, give BatchNorm real statistics
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    return model, loss_fn, inputs, targets, optimizer, train[15:]


def ours_trace(model, loss_fn, inputs, targets, method, start="gradient", max_iter=80, seed=1):
    """Run Lanczos with tolerance 0 and return [(seconds, estimate)] after each product.

    ``start`` is a vector (warm start), ``"gradient"`` (the estimator's cold-start
    default) or None (a Gaussian vector).
    """
    model.eval()
    trace = []
    started = time.perf_counter()
    with solve_mode(model):
        operator = HessianOperator(model, loss_fn, inputs, targets, method=method)
        if isinstance(start, str):
            start = operator.gradient()
        lanczos(operator, operator.dim, max_iter=max_iter, tol=0.0, start=start,
                generator=torch.Generator().manual_seed(seed),
                callback=lambda j, theta: trace.append((time.perf_counter() - started, theta)))
        operator.release()
    return trace


def ours_vector(model, loss_fn, inputs, targets, method):
    model.eval()
    with solve_mode(model):
        operator = HessianOperator(model, loss_fn, inputs, targets, method=method)
        estimate = lanczos(operator, operator.dim, max_iter=150, tol=1e-9, generator=torch.Generator().manual_seed(7))
        operator.release()
    return estimate


def pyhessian_trace(model, loss_fn, inputs, targets, max_iter=200, seed=1):
    """Run pyhessian's power iteration and return [(seconds, estimate)] after each product."""
    import pyhessian

    module = sys.modules["pyhessian.hessian"]
    original = module.hessian_vector_product
    trace = []
    started = time.perf_counter()

    def recording(grads, params, v):
        product = original(grads, params, v)
        theta = sum((h * w).sum() for h, w in zip(product, v)).item()  # v is unit-norm here
        trace.append((time.perf_counter() - started, theta))
        return product

    module.hessian_vector_product = recording
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = pyhessian.hessian(model, loss_fn, data=(inputs, targets), cuda=False)
            engine.eigenvalues(maxIter=max_iter, tol=1e-7)
    finally:
        module.hessian_vector_product = original
        for p in model.parameters():
            p.grad = None
    return trace


def time_to_accuracy(trace, reference):
    """Seconds until the estimate stays within ACCURACY of the reference (inf if never)."""
    for index, (seconds, theta) in enumerate(trace):
        if all(abs(t - reference) <= ACCURACY * abs(reference) for _, t in trace[index:]):
            return seconds, index + 1
    return math.inf, len(trace)


def product_ratios(model, loss_fn, inputs, targets, repeats):
    """Return {path: HVP seconds / forward+backward seconds}, medians over ``repeats`` timings."""
    model.eval()

    def median_time(fn, count=5):
        fn()  # warm-up
        times = []
        for _ in range(count * repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    params = [p for p in model.parameters() if p.requires_grad]

    def forward_backward():
        torch.autograd.grad(loss_fn(model(inputs), targets), params)

    base = median_time(forward_backward)
    ratios = {}
    vector = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    with solve_mode(model):
        for method in ("double_backward", "forward_over_reverse"):
            operator = HessianOperator(model, loss_fn, inputs, targets, method=method)
            ratios[method] = median_time(lambda: operator(vector)) / base
            if method == "double_backward":
                # The first product also builds the gradient graph; time that one apart.
                fresh = HessianOperator(model, loss_fn, inputs, targets, method=method)
                started = time.perf_counter()
                fresh(vector)
                ratios["double_backward_first"] = (time.perf_counter() - started) / base
            operator.release()
    return ratios


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def memory_child(which: str, data_root: str | None) -> None:
    """Print peak RSS growth (KiB) during one 30-product solve; runs in a fresh process (Linux)."""
    model, loss_fn, inputs, targets, _, _ = make_problem(data_root)
    model.eval()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    if which == "ours":
        ours_trace(model, loss_fn, inputs, targets, "double_backward", max_iter=30)
    else:
        pyhessian_trace(model, loss_fn, inputs, targets, max_iter=30)
    print(_status_kib("VmHWM") - before)


def memory_ratio(data_root: str | None) -> tuple[float, dict]:
    growth = {}
    for which in ("ours", "pyhessian"):
        command = [sys.executable, __file__, "--memory-child", which] + (["--data-root", data_root] if data_root else [])
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        growth[which] = int(output)
    return growth["ours"] / max(growth["pyhessian"], 1), growth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="folder holding cifar-10-batches-py/ (default: random images)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (medians are reported)")
    parser.add_argument("--memory-child", choices=("ours", "pyhessian"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.data_root)
        return
    torch.set_num_threads(torch.get_num_threads())

    model, loss_fn, inputs, targets, optimizer, later = make_problem(args.data_root)
    print(f"CIFAR-ResNet-20, batch {len(targets)}, {'real CIFAR-10 images' if args.data_root else 'random images'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    reference = ours_vector(model, loss_fn, inputs, targets, "double_backward")
    print(f"reference λ_max {reference.lambda_max:.6g} (residual {reference.residual:.2e}, "
          f"{reference.hvp_count} products, converged {reference.converged})")

    cold_times, pyhessian_times, cold_products, pyhessian_products = [], [], [], []
    random_times, random_products = [], []
    for repeat in range(args.repeats):
        seconds, products = time_to_accuracy(ours_trace(model, loss_fn, inputs, targets, "double_backward", seed=repeat),
                                             reference.lambda_max)
        cold_times.append(seconds)
        cold_products.append(products)
        seconds, products = time_to_accuracy(
            ours_trace(model, loss_fn, inputs, targets, "double_backward", start=None, seed=repeat), reference.lambda_max)
        random_times.append(seconds)
        random_products.append(products)
        seconds, products = time_to_accuracy(pyhessian_trace(model, loss_fn, inputs, targets, seed=repeat),
                                             reference.lambda_max)
        pyhessian_times.append(seconds)
        pyhessian_products.append(products)
    pyhessian_time = sorted(pyhessian_times)[len(pyhessian_times) // 2]
    cold_time = sorted(cold_times)[len(cold_times) // 2]
    random_time = sorted(random_times)[len(random_times) // 2]

    # Warm start: a few training steps later, start from the previous eigenvector.
    previous = reference.vector
    model.train()
    for x, y in later:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    moved = ours_vector(model, loss_fn, inputs, targets, "double_backward")
    warm_seconds, warm_products = time_to_accuracy(
        ours_trace(model, loss_fn, inputs, targets, "double_backward", start=previous), moved.lambda_max)
    moved_pyhessian = [time_to_accuracy(pyhessian_trace(model, loss_fn, inputs, targets, seed=r), moved.lambda_max)
                       for r in range(args.repeats)]
    moved_pyhessian_time = sorted(s for s, _ in moved_pyhessian)[len(moved_pyhessian) // 2]

    print(f"\ntime to {ACCURACY:g} relative error (medians of {args.repeats}):")
    print(f"  pyhessian power iteration: {pyhessian_products} products")
    print(f"  ours, cold start from the gradient (the default): {cold_products} products, "
          f"ratio to pyhessian {cold_time / pyhessian_time:.3f}  (target <= 0.5)")
    print(f"  ours, cold start from a Gaussian vector: {random_products} products, "
          f"ratio to pyhessian {random_time / pyhessian_time:.3f}")
    print(f"  ours, warm start after {len(later)} SGD steps: {warm_products} products, "
          f"ratio to pyhessian {warm_seconds / moved_pyhessian_time:.3f}  (target <= 0.25)")

    ratios = product_ratios(model, loss_fn, inputs, targets, args.repeats)
    print("\nHessian-vector product time / forward+backward time:")
    print(f"  double backward, graph reused: {ratios['double_backward']:.2f}")
    print(f"  double backward, first product (builds the graph): {ratios['double_backward_first']:.2f}")
    print(f"  forward-over-reverse: {ratios['forward_over_reverse']:.2f}  (target <= 2.6)")

    ratio, growth = memory_ratio(args.data_root)
    print(f"\npeak memory growth during a solve: ours {growth['ours']} KiB, pyhessian {growth['pyhessian']} KiB, "
          f"ratio {ratio:.2f}")
    print(json.dumps({
        "cold_over_pyhessian": cold_time / pyhessian_time,
        "warm_over_pyhessian": warm_seconds / moved_pyhessian_time,
        "double_backward_over_fwd_bwd": ratios["double_backward"],
        "forward_over_reverse_over_fwd_bwd": ratios["forward_over_reverse"],
        "memory_over_pyhessian": ratio,
    }))


if __name__ == "__main__":
    main()
