// Drives the official AG-UI client (@ag-ui/client's HttpAgent) for tests/behaviour/test_agui.py.
// argv: the agent's URL and a bearer token. Each stdin line is one step as JSON:
//   {"say": "text"}                      add a user message and run the agent
//   {"resume": [{"interruptId", "status", "payload"}]}   run again, answering the open interrupts
// For each step it prints one JSON line per event the client received ({"event": ...}), then
// {"done": {"newMessages", "pendingInterrupts"}} or {"failed": "message"}.
import { createInterface } from "node:readline";
import { HttpAgent } from "@ag-ui/client";

const [url, token, threadId] = process.argv.slice(2);
const agent = new HttpAgent({ url, threadId, headers: { Authorization: `Bearer ${token}` } });
const print = (line) => process.stdout.write(JSON.stringify(line) + "\n");
let count = 0;

for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const step = JSON.parse(line);
  const parameters = {};
  if (step.say !== undefined) {
    agent.addMessage({ id: `user-${++count}`, role: "user", content: step.say });
  }
  if (step.resume !== undefined) parameters.resume = step.resume;
  try {
    const result = await agent.runAgent(parameters, { onEvent: ({ event }) => print({ event }) });
    print({ done: { newMessages: result.newMessages, pendingInterrupts: agent.pendingInterrupts, messages: agent.messages } });
  } catch (error) {
    print({ failed: String(error && error.message ? error.message : error) });
  }
}
