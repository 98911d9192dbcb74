// The Vercel AI SDK's `openai(...)` model (the Responses API) against `dsv3 serve`, unchanged: a
// forced tool call, a structured object, streamed text and streamed tool steps.
//
//   dsv3 serve --model DIR --served-model-name tiny &
//   mkdir /tmp/vercel && cd /tmp/vercel && npm init -y && npm install ai @ai-sdk/openai zod
//   cp benchmarks/serve_clients/vercel_check.mjs /tmp/vercel/ && node /tmp/vercel/vercel_check.mjs http://127.0.0.1:8000
import { createOpenAI } from '@ai-sdk/openai';
import { generateObject, generateText, stepCountIs, streamText, tool } from 'ai';
import { z } from 'zod';

const base = process.argv[2] || 'http://127.0.0.1:8000';
const openai = createOpenAI({ baseURL: base + '/v1', apiKey: 'unused' });
const calls = [];
const tools = {
  ping: tool({ description: 'reach a host', inputSchema: z.object({ host: z.string().max(6) }),
               execute: async ({ host }) => { calls.push(host); return 'pong'; } }),
};
const r = await generateText({ model: openai('tiny'), prompt: 'ping the engine', tools, toolChoice: 'required',
                               maxOutputTokens: 120, temperature: 0.8, stopWhen: stepCountIs(1) });
if (!calls.length || r.finishReason !== 'tool-calls') throw new Error('no tool call');
console.log('tool calls:', r.toolCalls.map((c) => c.toolName).join(', '));
const o = await generateObject({ model: openai('tiny'), prompt: 'answer', maxOutputTokens: 80, temperature: 1.0,
                                 schema: z.object({ n: z.number().int().min(0).max(99), ok: z.boolean() }) });
console.log('object:', JSON.stringify(o.object));
const s = streamText({ model: openai('tiny'), prompt: 'the engine', maxOutputTokens: 10, temperature: 0 });
let text = '';
for await (const part of s.textStream) text += part;
console.log('streamed text:', JSON.stringify(text), await s.finishReason);
const before = calls.length;
const s2 = streamText({ model: openai('tiny'), prompt: 'ping', tools, toolChoice: 'required', maxOutputTokens: 120,
                        temperature: 0.8, stopWhen: stepCountIs(2) });
for await (const part of s2.fullStream) { if (part.type === 'error') throw part.error; }
if (calls.length === before) throw new Error('no streamed tool call');
console.log('streamed steps:', (await s2.steps).length);
console.log('Vercel AI SDK: OK');
