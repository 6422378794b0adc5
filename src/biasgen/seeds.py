"""Every seed of a twin experiment, derived from the master seed in one place.

    plan = SeedPlan(master=0, same_init=False)
    plan.model_init(m), plan.training(m)          # model m's weights and its batches/noise/dropout
    plan.evaluation("test_loss")                  # a frozen evaluation noise stream, the same at every checkpoint
    plan.sample_seeds(128)                        # one noise stream per shared-noise sample
    plan.describe(n_models)                       # the ``seeds`` block of summary.json

Nothing else in biasgen does seed arithmetic: a new random draw gets a named
stream here, so two draws can never share a seed by accident.
"""
from __future__ import annotations

from dataclasses import dataclass

# Frozen evaluation noise streams, as offsets from ``master * 1000 + 17``. Streams that
# exist once per split (``split`` argument) add the split index.
EVALUATION_STREAMS = {
    # images
    "test_loss": 0,  # (t, eps) per test image
    "f_mem_bootstrap": 0,  # bootstrap of the memorized fraction
    "train_loss": 1,  # (t, eps) per training image
    "score_inputs": 2,  # noise of the score-level similarity inputs
    # hierarchical sequences
    "critical_test": 0,  # test inputs at the critical time t/T
    "critical_train": 1,  # + split: each split's inputs at the critical time
    "loss_test": 100,  # (t, x_t) per test sequence for the cross-entropy
    "loss_train": 101,  # + split
    "loss_at_t_test": 150,  # noise of the test sequences for the loss decomposition at one t
    "loss_at_t_train": 151,  # + split
    "kl_along_t": 200,  # test inputs noised at every t of the KL-along-t grid
    "kl_along_t_train": 250,  # + split: each split's inputs on the same grid
    "uturn": 300,  # forward and reverse noise of the U-turns
    "uturn_random": 350,  # the uniformly random sequences of the random U-turns (their noise: + 1)
    # the single-run monitor
    "monitor_loss": 400,  # (t, eps) per loss image, the same for the held-out and the training subset (paired)
    "monitor_loss_heldout": 401,  # which held-out images enter the loss
    "monitor_loss_train": 402,  # which training images enter the loss
    "monitor_reference_heldout": 403,  # the size-matched nearest-neighbour reference sets
    "monitor_reference_train": 404,
}


@dataclass(frozen=True)
class SeedPlan:
    master: int  # the --seed of the run
    same_init: bool = False  # every model starts from the same weights

    def image_permutation(self) -> int:
        """Permutation of an image pool into splits and a test set."""
        return self.master

    def pool(self) -> int:
        """Sampling of a generated pool (hierarchical sequences)."""
        return self.master * 1000 + 1

    def pool_permutation(self) -> int:
        """Permutation of a generated pool into splits and a test set."""
        return self.master * 1000 + 2

    def model_init(self, m: int) -> int:
        """Weight init of model ``m`` (one seed for all models with ``same_init``)."""
        return self.master * 1000 + (0 if self.same_init else m + 1)

    def training(self, m: int) -> int:
        """Batches, diffusion times, noise and dropout of model ``m`` (step ``s`` uses :func:`step_seed`)."""
        return self.master * 1000 + 500 + m

    def pretrain(self) -> int:
        """Init, batches and noise of a fine-tune's pretrained base (``biasgen finetune --pretrain``)."""
        return self.master * 1000 + 900

    def evaluation(self, stream: str, split: int = 0) -> int:
        """A frozen evaluation noise stream (see ``EVALUATION_STREAMS``)."""
        return self.master * 1000 + 17 + EVALUATION_STREAMS[stream] + split

    def sample_seeds(self, n: int) -> list[int]:
        """One noise stream per shared-noise sample ``j``: the same for every model and checkpoint."""
        return [self.master * 1_000_000 + 7919 * j for j in range(n)]

    def bootstrap(self, i: int = 0) -> int:
        """Resampling for the uncertainty of the ``i``-th located curve minimum."""
        return self.master + i

    def describe(self, n_models: int) -> dict:
        """The ``seeds`` block of ``summary.json``."""
        return {
            "master": self.master,
            "image_permutation": self.image_permutation(),
            "pool": self.pool(),
            "pool_permutation": self.pool_permutation(),
            "model_init": [self.model_init(m) for m in range(n_models)],
            "training": [self.training(m) for m in range(n_models)],
            "training_step": "training seed * 1000003 + step, per step",
            "evaluation": {name: self.evaluation(name) for name in EVALUATION_STREAMS},
            "evaluation_per_split": "critical_train, loss_train, loss_at_t_train and kl_along_t_train add the split index",
            "sample_noise": f"{self.master * 1_000_000} + 7919 * j for sample j",
            "bootstrap": f"{self.master} + i for the i-th located minimum",
        }


def step_seed(training_seed: int, step: int) -> int:
    """The seed of every random draw of one training step (so a resumed run is bit-identical)."""
    return (int(training_seed) * 1_000_003 + int(step)) % (2**63)
