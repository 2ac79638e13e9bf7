"""Data parallelism on PyTorch's own engine: torchrun starts W processes (ranks), one per GPU or CPU slot, every
one runs the whole script, and DistributedDataParallel (DDP) averages the gradients of the trained models.

    torchrun --standalone --nproc_per_node 2 -- train_sft.py --init out/base-arith --task arith --out out/sft-arith

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; init() reads them (NCCL between GPUs, gloo between CPU
processes). A plain `python script.py` sets none: nothing is initialised, world() is 1 and every helper here
hands its input back untouched, so a single process computes exactly what it did before this module existed.

How the work is split, so that W ranks compute what one process computes (up to float summation order):
  batches     --batch-size is the GLOBAL batch, the same whatever W; its indices are drawn from (--seed, step)
              on every rank, and rank r takes the r-th contiguous share (share()). A flag must divide evenly
              (check_divisible), so a run resumes with another W and continues the same trajectory.
  sampling    the engine seeds output row i with seed + i: a rank sampling rows lo..hi-1 of the global batch
              with seed + lo draws the very tokens one process draws for them. RL groups stay whole per rank.
  losses      each rank computes its PART of the global loss (its rows' terms over the global denominator),
              so the parts sum to the loss of one process; DDP averages gradients over the W ranks, so each
              rank backpropagates W x part (backward()). Logged values are all_sum()s of the parts.
  minibatches the RL updates' epochs x minibatches come from minibatches(): one permutation of the global rows
              (the same on every rank), each rank's own rows of each minibatch (a stand-in when none), and the
              weight that turns its own loss into its part (token mean, sequence mean or constant normaliser).
  statistics  what the algorithm defines over the whole batch (PPO's advantage whitening, the logged means)
              is computed from all_sum() or from rows gathered with cat() / gather(), never per rank.
  evaluation  prompts are shared out, results gathered back in prompt order on every rank.
  writing     rank 0 alone writes metrics, checkpoints, progress bars and printed lines (is_main()).
  resume      every rank loads OUT/ckpt: DDP keeps the full optimizer state on each rank, and the data
              position is a function of the step.
  exit        a rank whose main() returned waits at a barrier for the others (cli.run_main says why), then
              leaves the process group (destroy(), at exit).

Every helper is a collective when W > 1: call it on every rank, in the same order.
"""
import atexit
import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .cli import UserError


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun set up (if it did) -> the device this rank runs on: cuda:LOCAL_RANK
    on a GPU, the given device otherwise. Ranks other than 0 print nothing to stdout from here on (every rank
    computes the same numbers; rank 0 reports them); errors still reach stderr."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)  # NCCL and the object collectives use the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(destroy)
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def destroy():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def check_divisible(value: int, flag: str, per: int = 1, what: str = ""):
    """UserError unless `value` (a global count: --batch-size) splits evenly over the ranks, each share into
    `per` parts (gradient accumulation's micro-batches). Called on every rank before any collective."""
    W = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else world()
    if value % (W * per):
        parts = f"{W} ranks" + (f" x {per} micro-batches" if per > 1 else "")
        raise UserError(f"{flag} {value}{what} does not split evenly over {parts} (make it a multiple of "
                        f"{W * per})")


def share(n: int) -> tuple[int, int]:
    """This rank's contiguous share lo..hi-1 of n items; shares differ by at most one item and may be empty
    (n < W). Contiguous, so gathering the ranks' results in rank order restores item order."""
    return n * rank() // world(), n * (rank() + 1) // world()


# ------------------------------------------------------------------------------------------- collectives

def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(x):
    """Sum over the ranks of a number, a list of numbers or a tensor (returned as the same kind)."""
    if world() == 1:
        return x
    if torch.is_tensor(x):
        out = x.detach().clone().to(_comm_device())
        dist.all_reduce(out)
        return out.to(x.device)
    t = torch.tensor(x, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (any picklable items)."""
    if world() == 1:
        return items
    parts = [None] * world()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of t (N_r, ...) concatenated in rank order -> (sum N_r, ...), on t's device. A 2-D t
    may differ in width between ranks (sequences of different lengths): narrower ones are padded with 0."""
    if world() == 1:
        return t
    parts = [None] * world()
    dist.all_gather_object(parts, t.detach().cpu())  # through the CPU: a pickled CUDA tensor names its GPU
    if t.dim() == 2:
        width = max(p.shape[1] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
    return torch.cat(parts).to(t.device)


# ------------------------------------------------------------------------------------------- training

class Replica:
    """A trained model as its training forward must be called under DDP: the hidden states come from the DDP
    wrapper, whose forward arms the gradient all-reduce of the next backward; the heads are the model's own
    (the LM head's weight is the embedding's, which the wrapper already tracks). The scripts call a Replica
    where gradients flow (log-probs, values, reward scores) and the plain model everywhere else (sampling,
    evaluation, checkpoints)."""

    def __init__(self, model, ddp):
        self.model, self.ddp = model, ddp

    def __call__(self, idx):
        return self.ddp(idx)  # (B, T, C)

    def teacher_forced_logprobs(self, inputs, targets, temperature=1.0, return_entropy=False):
        return self.model.head_logprobs(self.ddp(inputs), targets, temperature, return_entropy)

    def scores(self, hidden):
        return self.model.scores(hidden)


def wrap(model):
    """The model to call where gradients flow: model itself in a single process, else a Replica around DDP.
    DDP copies rank 0's weights to every rank. Dropout masks must differ between ranks (they see different
    rows): the global RNG, the same on every rank until here (one --seed, or one resumed state), is reseeded
    from one draw of it plus the rank. With dropout on, W ranks therefore draw other masks than one process:
    only dropout-free runs match a single process exactly."""
    if world() == 1:
        return model
    device = next(model.parameters()).device
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    torch.manual_seed(int(torch.randint(2**62, ())) + rank())
    return Replica(model, ddp)


def accumulating(trained, last: bool):
    """Context for one micro-batch's forward and backward: DDP holds back its all-reduce until the step's last
    micro-batch (the gradients add up locally until then)."""
    if isinstance(trained, Replica) and not last:
        return trained.ddp.no_sync()
    return contextlib.nullcontext()


def backward(part: torch.Tensor):
    """Backward of this rank's part of the global loss: DDP averages the ranks' gradients, and the parts sum to
    the loss, so each rank backpropagates W x part."""
    (part * world() if world() > 1 else part).backward()


def own_rows(mb: torch.Tensor, lo: int, hi: int):
    """Of a global minibatch mb (row numbers in the whole batch), the rows this rank holds (it holds rows
    lo..hi-1) -> (their local row numbers, how many). A rank holding none gets its row 0 as a stand-in, whose
    loss the caller multiplies by 0: every rank must run the backward, in step, for DDP to average."""
    mine = mb[(mb >= lo) & (mb < hi)] - lo
    return (mine if len(mine) else mb.new_zeros(1)), len(mine)


class Minibatch:
    """One global minibatch as this rank sees it: `rows`, the local row numbers of the rows it holds (its row 0
    as a stand-in when it holds none, so that it still runs the backward DDP waits for), and the weights that
    turn this rank's own loss into its part of the minibatch's loss (the parts of all ranks sum to the loss
    one process computes on the whole minibatch; a stand-in's weight is 0)."""

    def __init__(self, global_rows: torch.Tensor, lo: int, hi: int):
        self.size = len(global_rows)  # rows of the whole minibatch, over every rank
        self.rows, self.n = own_rows(global_rows, lo, hi)

    def token_mean_weight(self, mask: torch.Tensor) -> torch.Tensor:
        """For a token mean (PPO): this rank's share of the minibatch's tokens. mask: (B, T) of this rank."""
        tokens = mask[self.rows].sum() * (self.n > 0)
        return tokens / all_sum(tokens)

    def sequence_mean_weight(self) -> float:
        """For a mean over sequences (GRPO): this rank's share of the minibatch's sequences."""
        return self.n / self.size

    def sum_weight(self) -> float:
        """For a sum over constant denominators (NFT, Dr.GRPO): its own rows give its part (0: a stand-in)."""
        return float(self.n > 0)

    def combine(self, values: list, weight) -> list:
        """Numbers each rank computed on its rows (token means, ...) -> the minibatch's, weighed as the loss."""
        number = lambda v: v.item() if torch.is_tensor(v) else float(v)  # noqa: E731
        return all_sum([number(v) * number(weight) for v in values])


def minibatches(rows: torch.Tensor, lo: int, hi: int, size: int, epochs: int, seed: int):
    """The minibatches of `epochs` passes over a batch: each pass shuffles `rows` (global row numbers of the
    batch's usable rows, on every rank alike) with the generator seed + epoch, and splits them into minibatches
    of `size` rows -> Minibatch for the rank holding rows lo..hi-1 of the batch. Nothing when rows is empty."""
    if not len(rows):
        return
    for epoch in range(epochs):
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch))
        for global_rows in rows[perm.to(rows.device)].split(size):
            yield Minibatch(global_rows, lo, hi)
