// A Node.js client of convsvc that knows only protos/: it watches conversations, starts, joins,
// sends to, tails, lists, talks over one Connect stream to and closes a conversation, then
// provokes an error, printing one JSON line per step.
// Usage: node client.mjs HOST:PORT PROTOS_DIR
import path from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";
import { fromStruct, toStruct } from "./struct.mjs";

const [address, protosDir] = process.argv.slice(2);
const CALL_DEADLINE_MS = 10_000;

const definition = protoLoader.loadSync(path.join(protosDir, "convsvc/v1/conversation_service.proto"), {
  includeDirs: [protosDir],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { ConversationService } = grpc.loadPackageDefinition(definition).convsvc.v1;
const client = new ConversationService(address, grpc.credentials.createInsecure());

function call(method, request) {
  const deadline = new Date(Date.now() + CALL_DEADLINE_MS);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// The google.rpc.Status in the grpc-status-details-bin trailer, for the ErrorInfo reason.
const rpcTypes = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: { nested: { Any: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } } } },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "google.protobuf.Any", id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: "string", id: 1 },
                domain: { type: "string", id: 2 },
                metadata: { keyType: "string", type: "string", id: 3 },
              },
            },
          },
        },
      },
    },
  },
});
function errorInfo(error) {
  const [raw] = error.metadata.get("grpc-status-details-bin");
  if (!raw) return null;
  const status = rpcTypes.lookupType("google.rpc.Status").decode(raw);
  const detail = status.details.find((d) => d.type_url.endsWith("/google.rpc.ErrorInfo"));
  return detail ? rpcTypes.lookupType("google.rpc.ErrorInfo").toObject(rpcTypes.lookupType("google.rpc.ErrorInfo").decode(detail.value)) : null;
}

function report(step, data) {
  process.stdout.write(JSON.stringify({ step, ...data }) + "\n");
}

// Reads the stream until `done(events)` holds, then cancels it.
function tail(conversationId, done) {
  return new Promise((resolve, reject) => {
    const events = [];
    const stream = client.StreamEvents({ conversation_id: conversationId, user_id: "node-user", start_id: "0" });
    const timer = setTimeout(() => { stream.cancel(); reject(new Error(`no match in ${JSON.stringify(events)}`)); }, CALL_DEADLINE_MS);
    stream.on("data", (response) => {
      events.push(...response.events.map((e) => ({ id: Number(e.id), ...fromStruct(e.payload) })));
      if (done(events)) { clearTimeout(timer); stream.cancel(); resolve(events); }
    });
    stream.on("error", (error) => { if (error.code !== grpc.status.CANCELLED) { clearTimeout(timer); reject(error); } });
  });
}

// WatchConversations: a snapshot first, then every change of this user's conversations.
const watched = { snapshot: null, changes: [] };
let snapshotTaken;
const snapshotReady = new Promise((resolve) => { snapshotTaken = resolve; });
const watch = client.WatchConversations({ user_id: "node-user" });
const watchClosed = new Promise((resolve, reject) => {
  const timer = setTimeout(() => { watch.cancel(); reject(new Error(`no close in ${JSON.stringify(watched)}`)); }, 30_000);
  watch.on("data", (response) => {
    if (response.snapshot_complete) {
      watched.snapshot = response.snapshot.map((w) => w.conversation.conversation_id);
      snapshotTaken();
    }
    for (const change of response.changes) {
      watched.changes.push([change.kind, change.watched.conversation.conversation_id, change.watched.connection_ids.length]);
      if (change.kind === "CONVERSATION_CHANGE_KIND_CLOSED") { clearTimeout(timer); watch.cancel(); resolve(); }
    }
  });
  watch.on("error", (error) => { if (error.code !== grpc.status.CANCELLED) { clearTimeout(timer); reject(error); } });
});
await snapshotReady;

// Connect: one bidirectional stream joins, sends (each answered in order) and receives events;
// ending our side makes the server answer, deliver what the sends appended, and disconnect.
function connect(conversationId, connectionId, text) {
  return new Promise((resolve, reject) => {
    const seen = { opened: null, results: [], events: [] };
    const stream = client.Connect();
    const timer = setTimeout(() => { stream.cancel(); reject(new Error(`connect stalled: ${JSON.stringify(seen)}`)); }, CALL_DEADLINE_MS);
    stream.on("data", (response) => {
      if (response.opened) {
        seen.opened = response.opened.connection.connection_id;
        stream.write({ send: { event: toStruct({ action: "message", args: { content: text } }), request_id: "node-connect-1" } });
      } else if (response.send_result) {
        seen.results.push({ request_id: response.send_result.request_id, event_id: Number(response.send_result.event_id) });
      } else if (response.events) {
        seen.events.push(...response.events.events.map((e) => ({ id: Number(e.id), ...fromStruct(e.payload) })));
        if (seen.events.some((e) => e.source === "agent" && e.message === text)) stream.end();
      }
    });
    stream.on("status", (status) => { clearTimeout(timer); seen.status = grpc.status[status.code]; resolve(seen); });
    stream.on("error", (error) => { clearTimeout(timer); reject(error); });
    stream.write({ open: { conversation_id: conversationId, connection_id: connectionId, user_id: "node-user" } });
  });
}

const cid = "node-demo";
const started = await call("StartConversation", { conversation_id: cid, user_id: "node-user", request_id: "node-start-1" });
report("start", { conversation_id: started.conversation.conversation_id, status: started.conversation.status });

const joined = await call("JoinConversation", { conversation_id: cid, connection_id: "node-conn", user_id: "node-user" });
report("join", { connection_id: joined.connection.connection_id });

const echoed = tail(cid, (events) => events.some((e) => e.source === "agent" && e.action === "message" && e.message === "hello from node"));
const sent = await call("SendEvent", {
  connection_id: "node-conn",
  user_id: "node-user",
  event: toStruct({ action: "message", args: { content: "hello from node" } }),
});
report("send", { event_id: Number(sent.event_id) });
const events = await echoed;
report("stream", { ids: events.map((e) => e.id), echo: events.find((e) => e.source === "agent" && e.action === "message").message });

const over = await connect(cid, "node-connect", "hello over connect");
report("connect", {
  opened: over.opened,
  results: over.results,
  echo: over.events.find((e) => e.source === "agent" && e.action === "message").message,
  ids: over.events.map((e) => e.id),
  status: over.status,
});
const afterConnect = await call("ListConnections", { user_id: "node-user" });
report("connections", { ids: afterConnect.connections.map((c) => c.connection_id) });

const listed = await call("ListConversations", { user_id: "node-user" });
report("list", { conversations: listed.conversations.map((c) => [c.conversation_id, c.status]) });

const closed = await call("CloseConversation", { conversation_id: cid, user_id: "node-user" });
report("close", { status: closed.conversation.status });
await watchClosed;
report("watch", watched);

try {
  await call("GetConversation", { conversation_id: "no-such-conversation", user_id: "node-user" });
  report("error", { code: "OK" });
} catch (error) {
  report("error", { code: grpc.status[error.code], info: errorInfo(error) });
}
client.close();
