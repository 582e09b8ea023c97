"""Cost of PFT: a training step with one Hessian column vs an EFS-only step, same batch, same run.

Batch: the 64-atom VASP Si supercell (Hessian label) + one DFT displaced supercell.
EFS-only step: energy/forces/stress loss, backward, AdamW. PFT step: the same plus
the stochastic Hessian-column term (one HVP, third-order backward). Steps are
interleaved so that load on the shared machine hits both alike.
Then the memory one PFT step needs (autograd graph + optimiser state), LoRA vs all parameters.

    python benchmarks/bench_finetune.py [--reps 3] [--threads 1] [--small]

Baseline: the EFS-only step. Target: PFT / EFS <= 2.5x.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def batch(small: bool):
    from almd.data import SI_PBE
    from almd.finetune.data import sample_from_atoms
    from almd.phonons.datasets import displaced_supercells, phonon_hessian

    supercell, h = phonon_hessian(SI_PBE / "phono3py_disp.yaml")
    supercell.info["hessian"] = h
    displaced = displaced_supercells(SI_PBE / "phono3py_disp.yaml")[0]
    if small:  # 8-atom stand-ins (quick check of the script, not the figure)
        from ase.build import bulk

        from almd.potentials import build_graph, hessian, load

        supercell = bulk("Si", "diamond", a=5.43, cubic=True)
        pot = load("sevennet-0").double()
        import torch

        supercell.info["hessian"] = hessian(pot, build_graph(supercell, pot.cutoff, torch.float64)).numpy()
        displaced = supercell.copy()
        displaced.rattle(0.01, seed=0)
        from ase.calculators.singlepoint import SinglePointCalculator

        displaced.calc = SinglePointCalculator(displaced, forces=np.zeros((8, 3)))
    return sample_from_atoms(supercell, "perfect"), sample_from_atoms(displaced, "displaced")


def make_step(strategy: str):
    import torch

    from almd.finetune import losses
    from almd.potentials import adapters, load

    pot = load("sevennet-0").float().train()
    adapters.apply_strategy(pot, strategy)
    params = adapters.trainable_parameters(pot)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-3)
    rng = np.random.default_rng(0)

    def step(samples, hessian: bool) -> float:
        t0 = time.perf_counter()
        if hessian:  # the trainer's fused step: one forward for EFS and the column
            j = int(rng.integers(3 * len(samples[0].atoms)))
            terms = losses.pft_terms(pot, list(samples), [j] + [None] * (len(samples) - 1), torch.float32)
        else:
            terms = losses.efs_terms(pot, list(samples), torch.float32)
        loss = 20 * terms["forces"] + 5 * terms["stress"] + 100 * terms.get("hessian", 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 100.0)
        opt.step()
        return time.perf_counter() - t0

    return step, adapters.count_trainable(pot)


def memory_of_step(strategy: str, samples) -> dict:
    """Bytes a PFT step holds beyond the model: tensors saved for backward (the autograd
    graph, found with saved-tensor hooks, counted once per storage) plus gradients and
    AdamW's two moments of the trainable parameters.
    """
    import torch

    step, n = make_step(strategy)
    seen: dict[int, int] = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(samples, True)
    params = 3 * 4 * n  # grad + exp_avg + exp_avg_sq, float32
    return {"strategy": strategy, "trainable": n, "graph_MB": sum(seen.values()) / 2**20,
            "optimizer_MB": params / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--small", action="store_true", help="8-atom Si instead of the 64-atom supercell")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    samples = batch(args.small)
    step, _ = make_step("full")
    step(samples, False), step(samples, True)  # warm-up (allocator, lazy imports)
    efs, pft = [], []
    for _ in range(args.reps):
        efs.append(step(samples, False))
        pft.append(step(samples, True))
    t_efs, t_pft = float(np.median(efs)), float(np.median(pft))
    n = len(samples[0].atoms)
    print(f"batch: {n}-atom Si supercell (Hessian label) + {len(samples[1].atoms)}-atom displaced supercell; "
          f"float32, {args.threads} thread(s), median of {args.reps}")
    print(f"EFS-only step (baseline): {t_efs:.2f} s   PFT step (EFS + one Hessian column): {t_pft:.2f} s")
    print(f"ratio PFT / EFS-only: {t_pft / t_efs:.2f}x  (target <= 2.5x)")
    if not args.skip_memory:
        rows = [memory_of_step(strategy, samples) for strategy in ("full", "lora")]
        for r in rows:
            print(f"memory of one PFT step, {r['strategy']:>4}: saved-for-backward {r['graph_MB']:.0f} MB + "
                  f"grads/AdamW {r['optimizer_MB']:.1f} MB, {r['trainable']} trainable parameters")
        total = [r["graph_MB"] + r["optimizer_MB"] for r in rows]
        print(f"ratio memory LoRA / full: {total[1] / total[0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
