"""Time eval_fewshot.logreg_accuracy (full-batch L-BFGS in torch) on synthetic features of two real sizes, and compare
its accuracy with scikit-learn's LogisticRegression under the same penalty (C = 1/lambd, no intercept) when installed.

    python benchmarks/bench_logreg.py                    # both cases; cuda when there is one
    python benchmarks/bench_logreg.py --skip-large       # only the CIFAR-10 10-shot case (a second on a CPU)
    python benchmarks/bench_logreg.py --sklearn-large    # also scikit-learn on the ImageNet-1% case (slow)

Cases: CIFAR-10 10-shot, 100 x 192 (ViT-Ti features), 10 classes; ImageNet 1%, 12,800 x 768 (ViT-B), 1000 classes
(target on one GPU: < 60 s). Features: Gaussian class means plus noise and a common offset, tuned to be partly
overlapping (so accuracy is neither 0 nor 100); test sets of 100 (CIFAR) and 10 (ImageNet) images per class.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_fewshot as ef  # noqa: E402


def synthetic(n_per_class, n_test_per_class, dim, num_classes, spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=g) * spread
    def draw(n):
        y = torch.arange(num_classes).repeat_interleave(n)
        return means[y] + torch.randn(len(y), dim, generator=g) + 1.0, y
    return (*draw(n_per_class), *draw(n_test_per_class))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(name, data, device, repeats, with_sklearn, lambd, max_iter):
    x, y, xt, yt = data
    ef.logreg_accuracy(x[:200], y[:200], xt[:200], yt[:200], device=device)  # warm-up: kernels, thread pools
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        acc, info = ef.logreg_accuracy(x, y, xt, yt, lambd=lambd, max_iter=max_iter, device=device, return_info=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    sk_acc = sk_s = None
    if with_sklearn:
        try:
            from sklearn.linear_model import LogisticRegression
        except ImportError:
            print(f"{name}: scikit-learn not installed, no reference")
        else:
            t0 = time.perf_counter()
            clf = LogisticRegression(C=1 / lambd, fit_intercept=False, tol=1e-6, max_iter=max_iter)
            clf.fit(ef.preprocess(x.double()).numpy(), y.numpy())
            sk_acc, sk_s = clf.score(ef.preprocess(xt.double()).numpy(), yt.numpy()), time.perf_counter() - t0
    times.sort()  # on a shared CPU the spread is large (other processes take the cores): median and best
    print(f"{name:<16} {len(x):>6} x {x.shape[1]:>4} x {int(y.max()) + 1:>4}  {str(device):<6} "
          f"{times[len(times) // 2]:8.3f} s median, {times[0]:.3f} s best of {repeats}  {info['iterations']:>4} it  "
          f"gap {info['rel_gap']:.1e}"
          f"  top-1 {100 * acc:6.2f}"
          + (f"  sklearn {100 * sk_acc:6.2f} ({sk_s:.2f} s)  diff {100 * (acc - sk_acc):+.2f}"
             if sk_acc is not None else ""), flush=True)
    return acc, sk_acc


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where logreg runs")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of the small case (the large one runs once)")
    p.add_argument("--skip-large", action="store_true", help="skip the 12,800 x 768 x 1000 case")
    p.add_argument("--sklearn-large", action="store_true", help="also run scikit-learn on the large case (slow)")
    p.add_argument("--lambd", type=float, default=2.5e-4, help="MSN / Layer Grafted penalty (divided by n)")
    p.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations at most")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    run_case("CIFAR-10 10-shot", synthetic(10, 100, 192, 10, 0.25), device, args.repeats, True, args.lambd,
             args.max_iter)
    if not args.skip_large:
        x, y, xt, yt = synthetic(13, 10, 768, 1000, 0.21)
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[torch.arange(0, 1000, 5) * 13] = False  # 12 images in every 5th class, 13 in the others: 12,800
        run_case("ImageNet 1%", (x[keep], y[keep], xt, yt), device, 1, args.sklearn_large, args.lambd, args.max_iter)


if __name__ == "__main__":
    main()
