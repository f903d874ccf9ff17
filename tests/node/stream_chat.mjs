// Streams one chat completion through OPENAI_BASE_URL with the official Node SDK; prints JSON.
import OpenAI from "openai";

const client = new OpenAI({ maxRetries: 0 }); // reads OPENAI_BASE_URL and OPENAI_API_KEY
const stream = await client.chat.completions.create({
  model: "gpt-4o-mini",
  messages: [{ role: "user", content: "hi" }],
  stream: true,
});
const tokens = [];
for await (const chunk of stream) {
  const t = chunk.choices[0]?.delta?.content;
  if (t) tokens.push(t);
}
console.log(JSON.stringify({ tokens }));
