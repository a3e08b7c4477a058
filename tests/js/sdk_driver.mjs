// Runs the real WuKongIM JS SDK (npm wukongimjssdk) under Node.js and reports what it sees.
//
//   node --import ./register.mjs sdk_driver.mjs <ws url> <uid> <token>
//
// One JSON object per line on stdout, for tests/js/test_jssdk.py:
//   {"event": "ws_open", "count": n}                 the SDK opened its n-th WebSocket (a (re)connect)
//   {"event": "status", "status": s, "reason": r}    a connect status change (1 connected, 0 disconnected,
//                                                    3 connect failed, 4 kicked) with the reason code
//   {"event": "message", ...}                        a message the SDK received live (its header flags too)
//   {"event": "conversation", ...}                   the SDK's conversation after a message: its unread count,
//                                                    the id of its last message, the SDK's total unread
//   {"event": "sendack", ...}                        the SENDACK of a message this SDK sent (see below)
// The SDK's own console output goes to stderr. It runs until stdin closes.
//
// Commands, one JSON object per line on stdin:
//   {"send": {"channel_id": c, "channel_type": t, "text": s}}   send a text message as an app does
//                                                               (`chatManager.send`, which sets RedDot)
//
// The SDK is written for browsers: Node.js 20 has no WebSocket global (without
// --experimental-websocket), so the `ws` package provides it.
import WebSocket from "ws";

const [addr, uid, token] = process.argv.slice(2);
let opened = 0;

class CountingWebSocket extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    this.addEventListener("open", () => emit({ event: "ws_open", count: ++opened }));
  }
}
globalThis.WebSocket = CountingWebSocket;

// The SDK logs freely to console.log; stdout carries only this driver's events.
console.log = (...args) => process.stderr.write(`${args.map(String).join(" ")}\n`);

function emit(event) {
  process.stdout.write(`${JSON.stringify(event)}\n`);
}

const { default: WKSDK } = await import("wukongimjssdk");
const sdk = WKSDK.shared();
sdk.config.addr = addr;
sdk.config.uid = uid;
sdk.config.token = token;

sdk.connectManager.addConnectStatusListener((status, reasonCode) => {
  emit({ event: "status", status, reason: reasonCode });
});
sdk.chatManager.addMessageListener((message) => {
  emit({
    event: "message",
    channel_id: message.channel.channelID,
    channel_type: message.channel.channelType,
    from_uid: message.fromUID,
    message_id: String(message.messageID),
    message_seq: message.messageSeq,
    text: message.content && message.content.text,
    red_dot: Boolean(message.header.reddot),
  });
});
sdk.conversationManager.addConversationListener((conversation, action) => {
  emit({
    event: "conversation",
    channel_id: conversation.channel.channelID,
    channel_type: conversation.channel.channelType,
    unread: conversation.unread,
    last_message_id: conversation.lastMessage ? String(conversation.lastMessage.messageID) : null,
    all_unread: sdk.conversationManager.getAllUnreadCount(),
    action,
  });
});
sdk.chatManager.addMessageStatusListener((ack) => {
  emit({
    event: "sendack",
    client_seq: ack.clientSeq,
    message_id: String(ack.messageID),
    message_seq: ack.messageSeq,
    reason: ack.reasonCode,
  });
});

sdk.connect();

let pending = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => {
  pending += chunk;
  const lines = pending.split("\n");
  pending = lines.pop();
  for (const line of lines.filter((l) => l.trim())) {
    const command = JSON.parse(line);
    if (command.send) {
      const { channel_id: channelID, channel_type: channelType, text } = command.send;
      sdk.chatManager.send(sdk.newMessageText(text), sdk.newChannel(channelID, channelType));
    }
  }
});
process.stdin.on("end", () => {
  sdk.disconnect();
  process.exit(0);
});
