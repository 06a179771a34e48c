"""Write arithmetic questions as a prompt dataset: ``python examples/arithmetic/make_prompts.py OUT.jsonl``.

Each row: ``{"input": "What is 23 + 58? Answer with a number.", "label": "81"}`` (add ``--apply_chat_template``
when training a chat model). Sums and differences of two numbers below ``--max_operand`` and products of a smaller
pair, seeded. The file is written to a temporary name and renamed when complete.
"""
import argparse
import json
import os
import random


def questions(n: int, *, seed: int, max_operand: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        op = rng.choice("+-*")
        hi = max_operand if op != "*" else max(2, int(max_operand ** 0.5) + 1)
        a, b = rng.randrange(hi), rng.randrange(hi)
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append({"input": f"What is {a} {op} {b}? Answer with a number.", "label": str(result)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--n", type=int, default=512, help="number of questions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_operand", type=int, default=100, help="operands are below this")
    args = p.parse_args()
    if args.n < 1 or args.max_operand < 2:
        p.error("--n must be >= 1 and --max_operand >= 2")
    tmp = f"{args.out}.partial-{os.getpid()}"
    with open(tmp, "w") as f:
        for row in questions(args.n, seed=args.seed, max_operand=args.max_operand):
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
