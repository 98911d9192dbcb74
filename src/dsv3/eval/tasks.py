"""Accuracy on verifiable tasks (:mod:`dsv3.tasks`): seeded problems, answers from the engine.

Each problem is asked through the chat template in thinking mode and answered by :class:`dsv3.LLM`
(greedy by default, so the number is a deterministic function of the model, the task and the seed;
with ``temperature > 0`` every request gets its own seed derived from ``seed``). Reported: accuracy
(exact-match answers), format rate (well-formed ``REASONING</think>ANSWER``), mean reward.
"""

from __future__ import annotations


def task_accuracy(model, tokenizer, task, n: int = 64, seed: int = 0, max_new_tokens: int = 48,
                  temperature: float = 0.0, samples: int = 3) -> dict:
    """Evaluate ``model`` (a :class:`dsv3.Transformer`, used live: a fresh engine wraps it) on ``n`` problems.

    Returns ``{"task", "n", "seed", "accuracy", "format_rate", "mean_reward", "samples"}`` where
    ``samples`` shows the first few (prompt, completion, correct) triples.
    """
    from ..engine import LLM, SamplingParams
    from ..tasks import completion_text, parse_completion, problems

    if n < 1:
        raise ValueError(f"need at least one problem, got n={n}")
    probs = problems(task, n, seed)
    prompts = [tokenizer.render_chat(p.messages(), add_generation_prompt=True, thinking=True) for p in probs]
    was_training = model.training       # the engine switches the module to eval mode
    llm = LLM(model, tokenizer, max_num_seqs=min(n, 64), max_model_len=max(map(len, prompts)) + max_new_tokens)
    params = [SamplingParams(temperature=temperature, max_tokens=max_new_tokens, stop_token_ids=tokenizer.stop_ids(),
                             seed=seed * 1_000_003 + i) for i in range(n)]
    try:
        outs = llm.generate(prompts, params)
    finally:
        model.train(was_training)
    texts = [completion_text(tokenizer, o.token_ids) for o in outs]
    correct = [task.correct(p.prompt, t) for p, t in zip(probs, texts)]
    rewards = [task.reward(p.prompt, t) for p, t in zip(probs, texts)]
    formatted = [parse_completion(t)[0] for t in texts]
    return {"task": task.name, "n": n, "seed": seed, "temperature": temperature,
            "accuracy": sum(correct) / n, "format_rate": sum(formatted) / n, "mean_reward": sum(rewards) / n,
            "samples": [{"prompt": p.prompt, "completion": t, "correct": c}
                        for p, t, c in list(zip(probs, texts, correct))[:samples]]}
