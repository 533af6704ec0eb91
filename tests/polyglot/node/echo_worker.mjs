// An agent worker in Node.js, built from protos/ alone: it attaches to convsvc over the worker
// protocol (convsvc.v1.AgentWorkerService) and runs the echo behaviour as the agent kind
// "node-echo", numbering its events from each assignment's next_event_id. With the setting
// echo_reply_delay_seconds it "thinks" before each answer, and it obeys run control
// (change_agent_state): paused holds its answers until running; stopped drops them. With the
// setting confirmation_mode it proposes each message as a command and waits for its approval
// (user_confirmed runs it, user_rejected drops it), in OpenHands' order and shapes.
// Usage: node echo_worker.mjs HOST:PORT PROTOS_DIR WORKER_ID
// Prints {"step": "attached"} once convsvc welcomed it, and one JSON line per assignment end.
import path from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import { fromStruct, toStruct } from "./struct.mjs";

const [address, protosDir, workerId] = process.argv.slice(2);
const KIND = "node-echo";

const definition = protoLoader.loadSync(path.join(protosDir, "convsvc/v1/agent_worker_service.proto"), {
  includeDirs: [protosDir],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { AgentWorkerService } = grpc.loadPackageDefinition(definition).convsvc.v1;
const client = new AgentWorkerService(address, grpc.credentials.createInsecure());

const say = (line) => process.stdout.write(JSON.stringify(line) + "\n");
const state = (agentState) => ({
  observation: "agent_state_changed",
  content: "",
  extras: { agent_state: agentState, reason: "" },
  message: `Agent state changed to ${agentState}`,
});

const stream = client.Attach();
const loops = new Map(); // conversation id -> { assignment, nextId, history, started, initial }

function emit(loop, cid, source, payload, deliveryId = "") {
  stream.write({
    events: {
      conversation_id: cid,
      assignment: loop.assignment,
      events: [{ id: loop.nextId, source, payload: toStruct(payload), delivery_id: deliveryId }],
    },
  });
  loop.nextId += 1;
}

function answer(loop, cid) {
  while (loop.waiting.length && !loop.paused && !loop.timer) {
    emit(loop, cid, "environment", state("running"));
    if (loop.delayMs > 0) {
      loop.timer = setTimeout(() => {
        loop.timer = null;
        reply(loop, cid, loop.waiting.shift());
        answer(loop, cid);
      }, loop.delayMs);
      return;
    }
    reply(loop, cid, loop.waiting.shift());
  }
}

function reply(loop, cid, content) {
  emit(loop, cid, "agent", {
    action: "message",
    message: content,
    args: { content, image_urls: null, wait_for_response: true },
  });
  emit(loop, cid, "environment", state("awaiting_user_input"));
}

function command(text, confirmationState) {
  const risky = ["rm ", "sudo "].some((word) => `${text} `.includes(word));
  return {
    action: "run",
    message: `Running command: ${text}`,
    args: {
      command: text,
      is_input: false,
      thought: "",
      blocking: false,
      hidden: false,
      confirmation_state: confirmationState,
      security_risk: risky ? 2 : 0,
    },
  };
}

function propose(loop, cid, text) {
  loop.proposed = text;
  emit(loop, cid, "environment", state("running"));
  emit(loop, cid, "environment", state("awaiting_user_confirmation"));
  emit(loop, cid, "agent", command(text, "awaiting_confirmation"));
}

function decided(loop, cid, approved) {
  const text = loop.proposed;
  loop.proposed = null;
  emit(loop, cid, "environment", state(approved ? "user_confirmed" : "user_rejected"));
  const cause = loop.nextId;
  emit(loop, cid, "agent", command(text, approved ? "confirmed" : "rejected"));
  if (approved) {
    emit(loop, cid, "environment", state("running"));
    emit(loop, cid, "environment", {
      observation: "run",
      content: text,
      extras: { command: text, metadata: { exit_code: 0 } },
      message: `Command \`${text}\` executed with exit code 0.`,
      cause,
    });
  } else {
    const rejected = "Action has been rejected by the user! Waiting for further user input.";
    emit(loop, cid, "environment", { observation: "user_rejected", content: rejected, extras: {}, message: rejected, cause });
  }
  emit(loop, cid, "environment", state("awaiting_user_input"));
  if (loop.waiting.length) propose(loop, cid, loop.waiting.shift());
}

function halt(loop) {
  if (loop.timer) clearTimeout(loop.timer);
  loop.timer = null;
}

function deliver(loop, cid, deliveryId, payload) {
  emit(loop, cid, "user", payload, deliveryId);
  if (payload.action === "message") {
    loop.waiting.push(String(payload.args?.content ?? ""));
    if (!loop.confirming) answer(loop, cid);
    else if (loop.proposed === null && !loop.paused) propose(loop, cid, loop.waiting.shift());
  } else if (payload.action === "change_agent_state") {
    const asked = String(payload.args?.agent_state ?? "");
    if ((asked === "user_confirmed" || asked === "user_rejected") && loop.proposed !== null) {
      decided(loop, cid, asked === "user_confirmed");
    } else if (asked === "paused" && !loop.paused) {
      halt(loop);
      loop.paused = true;
      emit(loop, cid, "environment", state("paused"));
    } else if (asked === "running" && loop.paused) {
      loop.paused = false;
      if (loop.proposed !== null) propose(loop, cid, loop.proposed); // it asks again
      else if (loop.waiting.length) answer(loop, cid);
      else {
        emit(loop, cid, "environment", state("running"));
        emit(loop, cid, "environment", state("awaiting_user_input"));
      }
    } else if (asked === "stopped") {
      halt(loop);
      loop.paused = false;
      loop.waiting = [];
      loop.proposed = null;
      emit(loop, cid, "environment", state("stopped"));
    }
  }
}

function startWhenComplete(loop, cid) {
  if (loop.started || loop.history < loop.nextId) return;
  loop.started = true;
  emit(loop, cid, "environment", state("awaiting_user_input"));
  if (loop.initial) deliver(loop, cid, "", loop.initial);
}

stream.on("data", (message) => {
  switch (message.message) {
    case "welcome": {
      const interval = Number(message.welcome.ping_interval.seconds) * 1000 +
        message.welcome.ping_interval.nanos / 1e6;
      setInterval(() => stream.write({ ping: {} }), interval / 2).unref();
      say({ step: "attached", worker_id: message.welcome.worker_id });
      break;
    }
    case "assign": {
      const a = message.assign;
      const loop = {
        assignment: a.assignment,
        nextId: a.next_event_id,
        history: 0,
        started: false,
        initial: a.initial_user_message ? fromStruct(a.initial_user_message) : null,
        delayMs: Number(fromStruct(a.settings ?? { fields: {} }).echo_reply_delay_seconds ?? 0) * 1000,
        confirming: Boolean(fromStruct(a.settings ?? { fields: {} }).confirmation_mode),
        proposed: null,
        waiting: [],
        paused: false,
        timer: null,
      };
      loops.set(a.conversation_id, loop);
      startWhenComplete(loop, a.conversation_id);
      break;
    }
    case "history": {
      const loop = loops.get(message.history.conversation_id);
      if (!loop || loop.assignment !== message.history.assignment) break;
      loop.history += message.history.events.length;
      startWhenComplete(loop, message.history.conversation_id);
      break;
    }
    case "deliver": {
      const d = message.deliver;
      const loop = loops.get(d.conversation_id);
      if (loop && loop.assignment === d.assignment) deliver(loop, d.conversation_id, d.delivery_id, fromStruct(d.payload));
      break;
    }
    case "stop": {
      const s = message.stop;
      const stopping = loops.get(s.conversation_id);
      if (stopping) halt(stopping);
      loops.delete(s.conversation_id);
      stream.write({ released: { conversation_id: s.conversation_id, assignment: s.assignment } });
      say({ step: "released", conversation_id: s.conversation_id });
      break;
    }
  }
});
stream.on("error", (error) => {
  say({ step: "error", code: grpc.status[error.code], details: error.details });
  process.exit(1);
});
stream.on("end", () => process.exit(0));
process.on("SIGTERM", () => { stream.end(); });

stream.write({ hello: { worker_id: workerId, agent_kinds: [KIND], capacity: 4 } });
