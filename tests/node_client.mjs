// A gateway client in Node.js with nothing but the runtime's own fetch (Node 18+): no npm
// packages, no Python. It submits a generate-and-refine job, follows its Server-Sent
// Events to `succeeded` and downloads the image; then uploads that image as a refine-only
// job (POST /v1/jobs:upload, the raw image as the body), follows it and downloads its
// result. Both downloads must be PNGs of the size asked for.
//
//   GATEWAY_URL=http://127.0.0.1:8080 API_KEY=rfk_... node tests/node_client.mjs
//
// Prints one JSON line (both jobs' ids, event names and image sizes); exits 1 on failure.
// Run by tests/test_gateway_node.py against a real stack and gateway.

const base = process.env.GATEWAY_URL ?? "http://127.0.0.1:8080";
const key = process.env.API_KEY;
const size = Number(process.env.SIZE ?? 64);
if (!key) throw new Error("set API_KEY");
const auth = { Authorization: `Bearer ${key}` };

async function expectStatus(response, status) {
  if (response.status !== status) {
    throw new Error(`${response.url}: ${response.status} ${await response.text()}`);
  }
  return response;
}

// POST /v1/jobs (JSON) or /v1/jobs:upload (raw image): the 202's record.
async function submit(path, body, contentType) {
  const response = await fetch(`${base}${path}`, {
    method: "POST",
    headers: { ...auth, "Content-Type": contentType },
    body,
  });
  return (await expectStatus(response, 202)).json();
}

// GET /v1/jobs/{id}/events until the gateway ends the stream: every [event, record].
async function follow(jobId) {
  const response = await expectStatus(await fetch(`${base}/v1/jobs/${jobId}/events`, { headers: auth }), 200);
  if (!response.headers.get("content-type").startsWith("text/event-stream")) {
    throw new Error(`not an event stream: ${response.headers.get("content-type")}`);
  }
  const events = [];
  let buffer = "";
  const decoder = new TextDecoder();
  for await (const chunk of response.body) {
    buffer += decoder.decode(chunk, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    // An event is its lines up to a blank one; a line starting with ':' is a comment.
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) events.push([name, JSON.parse(data.join("\n"))]);
    }
  }
  return events;
}

// The PNG signature, then IHDR's width and height (big-endian, bytes 16-23).
function pngSize(bytes) {
  const signature = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
  if (bytes.length < 24 || !signature.every((b, i) => bytes[i] === b)) throw new Error("not a PNG");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return [view.getUint32(16), view.getUint32(20)];
}

// Follow a job to `succeeded` and download its image from the presigned URL.
async function finish(jobId) {
  const events = await follow(jobId);
  const [state, record] = events.at(-1);
  if (state !== "succeeded") throw new Error(`job ${jobId} ended ${state}: ${JSON.stringify(record.error)}`);
  const image = new Uint8Array(await (await expectStatus(await fetch(record.result.url), 200)).arrayBuffer());
  const [width, height] = pngSize(image);
  if (width !== size || height !== size) throw new Error(`image is ${width}x${height}, not ${size}x${size}`);
  return { job_id: jobId, events: events.map(([name]) => name), bytes: image.length, width, height, image };
}

const job = { kind: "generate_and_refine", prompt: "portrait of a lighthouse keeper", seed: 11, width: size, height: size };
const generated = await finish((await submit("/v1/jobs", JSON.stringify(job), "application/json")).job_id);
const uploaded = await submit("/v1/jobs:upload?output_format=png", generated.image, "image/png");
const refined = await finish(uploaded.job_id);
for (const done of [generated, refined]) delete done.image;
console.log(JSON.stringify({ generate_and_refine: generated, refine_only: refined }));
