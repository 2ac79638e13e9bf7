"""The study's method names: pipeline.py names its stages with them (OUT/<task>/<method>-seed<s>), and report.py
and plots.py group and order the evaluated policies by them. One description that both sides read, so a renamed
stage cannot silently fall out of a table."""

WARMUP = "warmup"  # arith's short SFT that teaches the chat format: the start of SFT, DFT, best-of-N, adaptations
TEACHER = "sft-long"  # SFT trained longer: RL starts from it (each seed), and seed 0 is the imitation teacher
LORA = "lora-r"  # + rank: LoRA adapters on the warm-up
PROMPT_TUNING = "prompt-tuning"  # virtual prompt tokens on the warm-up
RETRIEVAL = "rag-"  # + warmup-k<k> or sft-k<k>: a frozen model prompted with retrieved solved examples
STUDENT = "student-"  # + preset-n<n>: a smaller base fine-tuned on true demonstrations
IMITATOR = "imitation-"  # + preset-n<n>: a smaller base fine-tuned on the teacher's answers
REWARD_MODEL = "rm-"  # reward models: trained, never evaluated as policies
DEMOS = "demos-"  # rm-demos-seed<s>, bon-demos-test-seed<s>: best-of-N's second selector, learnt from demonstrations
CHEAP = ("lora-", PROMPT_TUNING, RETRIEVAL)  # the cheap adaptations (question 6)
IMITATION = (STUDENT, IMITATOR)  # the students (question 5)
SFT_LIKE = ("sft", "dft")  # SFT and DFT runs (any learning rate, the teacher too): also scored on validation
# row order of the report's tables: by the first prefix a method name starts with, then by name
ORDER = (WARMUP, "sft", "dft", "grpo", "nft", "rft", "lora-", PROMPT_TUNING, RETRIEVAL, STUDENT, IMITATOR, "dpo-", "ppo-")


def split_name(stage_name: str) -> tuple[str, str, int]:
    """"arith/grpo-seed1" -> ("arith", "grpo", 1); no -seed suffix: seed 0."""
    task, _, policy = stage_name.rpartition("/")
    method, _, seed = policy.partition("-seed")
    return task.split("/")[0], method, int(seed or 0)
