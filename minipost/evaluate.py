"""Scoring a policy on a task split: batched generation through the engine, then the task's reward."""
import torch

from .engine import generate


def prompt_ids(tokenizer, rows) -> list[list[int]]:
    """Rows with a `prompt` column (string or messages) -> rendered prompts ending in <|assistant|>."""
    return [tokenizer.render_prompt([{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str)
                                    else r["prompt"]) for r in rows]


def completion_text(tokenizer, ids: list[int]) -> str:
    """Decode a completion, without its closing <|end|>."""
    if ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def reward_kwargs(rows) -> dict:
    """Extra dataset columns, as lists, for a TRL-style reward function (e.g. arith's `answer`)."""
    keys = [k for k in rows[0] if k != "prompt"]
    return {k: [r[k] for r in rows] for k in keys}


@torch.no_grad()
def sample_completions(model, tokenizer, rows, max_new_tokens=64, temperature=0.0, num_samples=1,
                       batch_size=64, seed=0):
    """Generate for every prompt row -> (texts, Generation per batch). Row order: prompt-major."""
    was_training = model.training
    model.eval()
    prompts = prompt_ids(tokenizer, rows)
    texts = []
    for start in range(0, len(prompts), batch_size):
        g = generate(model, prompts[start:start + batch_size], max_new_tokens, tokenizer.eos_id, tokenizer.pad_id,
                     temperature=temperature, num_samples=num_samples, seed=seed + start * num_samples)
        texts.extend(completion_text(tokenizer, c) for c in g.completions())
    model.train(was_training)
    return texts


def evaluate_policy(model, tokenizer, task, rows, max_new_tokens=64, temperature=0.0, batch_size=64, seed=0):
    """Mean task reward (accuracy for arith's verifier) and format rate of one completion per prompt."""
    texts = sample_completions(model, tokenizer, rows, max_new_tokens, temperature, 1, batch_size, seed)
    rewards = task.reward([r["prompt"] for r in rows], texts, **reward_kwargs(rows))
    formats = task.format_ok(texts)
    return {"reward": sum(rewards) / len(rewards), "format": sum(formats) / len(formats), "n": len(rows),
            "example": texts[0]}
