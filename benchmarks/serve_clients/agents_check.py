"""The openai-agents SDK's default model (``OpenAIResponsesModel``) against ``dsv3 serve``, unchanged:
an agent that must call a function tool (the tool's output goes back in the next turn) and an agent
with a structured ``output_type``, streamed and not.

    dsv3 serve --model DIR --served-model-name tiny &
    python -m venv /tmp/agents && /tmp/agents/bin/pip install openai-agents
    /tmp/agents/bin/python benchmarks/serve_clients/agents_check.py http://127.0.0.1:8000

A random test model never ends a free-text turn, so the follow-up turn is biased towards the end
of reply (``logit_bias`` on EOS through ``extra_body``); forced tool calls and the structured output
are grammar-constrained and need no help. Last run: see docs/serving.md.
"""

import asyncio
import sys

from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

EOS_ID = "1"        # <｜end▁of▁sentence｜> in tokenizers trained by dsv3


class Answer(BaseModel):
    n: int = Field(ge=0, le=99)
    ok: bool


async def main(base: str) -> None:
    set_tracing_disabled(True)
    model = OpenAIResponsesModel(model="tiny", openai_client=AsyncOpenAI(base_url=base + "/v1", api_key="unused"))
    calls = []

    @function_tool
    def ping(host: str) -> str:
        """Reach a host."""
        calls.append(host)
        return "pong"

    agent = Agent(name="tools", instructions="use tools", tools=[ping], model=model,
                  model_settings=ModelSettings(tool_choice="required", max_tokens=120, temperature=0.8,
                                               extra_body={"logit_bias": {EOS_ID: 100}}))
    result = await Runner.run(agent, "ping the engine", max_turns=4)
    assert calls, "the tool was not called"
    print(f"tool run: {len(calls)} call(s), final output {result.final_output!r}")
    agent = Agent(name="structured", instructions="answer", model=model, output_type=Answer,
                  model_settings=ModelSettings(max_tokens=80, temperature=1.0))
    result = await Runner.run(agent, "answer")
    assert isinstance(result.final_output, Answer)
    streamed = Runner.run_streamed(agent, "answer")
    async for _ in streamed.stream_events():
        pass
    assert isinstance(streamed.final_output, Answer)
    print(f"structured output: {result.final_output!r}, streamed: {streamed.final_output!r}")
    print("openai-agents: OK")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"))
