// The assistant page: asks through the gateway, streams the answer (OpenAI server-sent events),
// and follows the gateway's maintenance switch. Model output only ever goes into textContent,
// so an answer holding HTML shows as text. Nothing is stored: the conversation and a pasted
// key live in this tab's memory and are gone on reload.
"use strict";

(function () {
  var $ = function (id) { return document.getElementById(id); };
  var state = {
    config: null,
    key: "",          // auth=pasteKey only: never written to storage, cookies or the DOM
    messages: [],     // the conversation sent with each question
    conversation: newConversationId(),  // keeps a conversation on one version during a canary (--sticky conversation)
    busy: false,
    maintenance: null,
    pollTimer: 0
  };

  function newConversationId() {
    var bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
  }

  function setStatus(text, isError) {
    var el = $("status");
    el.textContent = text || "";
    el.classList.toggle("error", !!isError);
  }

  function addTurn(role, text) {
    var li = document.createElement("li");
    li.className = "turn " + role;
    var who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    var body = document.createElement("p");
    body.className = "text";
    body.textContent = text;
    li.appendChild(who);
    li.appendChild(body);
    $("log").appendChild(li);
    li.scrollIntoView({ block: "end" });
    return li;
  }

  function modelLabel(model, version) {
    return version ? model + " \u00b7 version " + version : model;
  }

  function canAsk() {
    return !state.busy && !state.maintenance && (state.config.auth !== "pasteKey" || state.key !== "");
  }

  function render() {
    var paused = !!state.maintenance;
    var needKey = state.config.auth === "pasteKey";
    $("maintenance").hidden = !paused;
    $("ask-form").hidden = paused;
    $("key-panel").hidden = paused || !needKey;
    $("key-form").hidden = state.key !== "";
    $("key-set").hidden = state.key === "";
    $("send").disabled = !canAsk();
    $("question").disabled = state.busy || paused;
    $("new-chat").disabled = state.busy || state.messages.length === 0;
    $("question-hint").textContent = needKey && !state.key
      ? "Paste an API key above first." : "Enter sends; Shift+Enter starts a new line.";
  }

  function showMaintenance(message) {
    state.maintenance = message || "The assistant is offline for maintenance.";
    $("maintenance-message").textContent = state.maintenance;
    render();
  }

  function endMaintenance() {
    if (state.maintenance === null) return;
    var wasPaused = !!state.maintenance;
    state.maintenance = null;
    render();
    if (wasPaused) {
      setStatus("The assistant is back.");
      $("question").focus();
    }
  }

  // The switch: a cheap JSON the gateway answers itself, polled so the page pauses and comes back
  // without a reload. A failed poll (a gateway restarting) keeps the current state.
  function pollStatus() {
    clearTimeout(state.pollTimer);
    return fetch("/ui/status", { cache: "no-store" })
      .then(function (resp) { return resp.ok ? resp.json() : null; })
      .then(function (status) {
        if (!status) return;
        if (status.maintenance) showMaintenance(status.message); else endMaintenance();
      })
      .catch(function () {})
      .then(function () {
        state.pollTimer = setTimeout(pollStatus, state.config.statusPollSeconds * 1000);
      });
  }

  function retryAfterSeconds(resp, fallback) {
    var n = parseInt(resp.headers.get("Retry-After") || "", 10);
    return n > 0 && n < 3600 ? n : fallback;
  }

  function errorBody(resp) {
    return resp.json().then(function (body) {
      return body && body.error ? body.error : {};
    }, function () { return {}; });
  }

  function countdown(seconds) {
    return new Promise(function (resolve) {
      var left = seconds;
      var tick = function () {
        if (left <= 0) { resolve(); return; }
        setStatus("Busy, retry in " + left + " s");
        left -= 1;
        setTimeout(tick, 1000);
      };
      tick();
    });
  }

  function post(messages) {
    var headers = { "Content-Type": "application/json", "X-Lawtune-Conversation": state.conversation };
    if (state.config.auth !== "pasteKey") headers["X-Lawtune-Page"] = "1";  // ingress, loopback: the gateway adds the key
    else headers.Authorization = "Bearer " + state.key;
    return fetch(state.config.apiPath, {
      method: "POST",
      headers: headers,
      cache: "no-store",
      credentials: "same-origin",
      body: JSON.stringify({
        model: state.config.model, messages: messages, stream: true, max_tokens: state.config.maxTokens
      })
    });
  }

  // Server-sent events: "data: {chunk}" lines, "data: [DONE]" at the end.
  function readStream(resp, onText, onModel) {
    var reader = resp.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    var text = "";
    function handle(line) {
      if (line.indexOf("data:") !== 0) return false;
      var data = line.slice(5).trim();
      if (data === "[DONE]") return true;
      var chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the model stopped with an error");
      if (chunk.model) onModel(chunk.model);
      var choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        text += choice.delta.content;
        onText(text);
      }
      return false;
    }
    function pump() {
      return reader.read().then(function (part) {
        if (part.done) return text;
        buffer += decoder.decode(part.value, { stream: true });
        var nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          var line = buffer.slice(0, nl).trim();
          buffer = buffer.slice(nl + 1);
          if (handle(line)) { reader.cancel().catch(function () {}); return text; }
        }
        return pump();
      });
    }
    return pump();
  }

  // A question that got no answer is taken back: its turn leaves the conversation and the text
  // returns to the input, so asking again is one key press.
  function takeBack(question, turns) {
    state.messages.pop();
    turns.forEach(function (li) { li.remove(); });
    if (!$("question").value) $("question").value = question;
  }

  function ask(question) {
    state.busy = true;
    setStatus("");
    state.messages.push({ role: "user", content: question });
    var userTurn = addTurn("user", question);
    var answerTurn = addTurn("assistant", "");
    var answerText = answerTurn.querySelector(".text");
    answerTurn.setAttribute("aria-busy", "true");
    answerText.textContent = "\u2026";
    render();

    var version = state.config.modelVersion;
    var model = state.config.model;
    function send(retried) {
      return post(state.messages).then(function (resp) {
        if (resp.status === 429 && !retried) {
          return countdown(retryAfterSeconds(resp, 5)).then(function () { return send(true); });
        }
        return resp;
      });
    }

    return send(false).then(function (resp) {
      if (resp.ok) {
        version = resp.headers.get("X-Lawtune-Model-Version") || version;
        setStatus("Answering\u2026");
        return readStream(resp, function (text) {
          answerText.textContent = text;
        }, function (name) { model = name; }).then(function (answer) {
          state.messages.push({ role: "assistant", content: answer });
          answerTurn.removeAttribute("aria-busy");
          if (!answer) answerText.textContent = "(no answer)";
          var meta = document.createElement("span");
          meta.className = "meta";
          meta.textContent = modelLabel(model, version);
          answerTurn.appendChild(meta);
          $("model").textContent = "Answered by " + modelLabel(model, version);
          setStatus("");
        });
      }
      return errorBody(resp).then(function (err) {
        takeBack(question, [userTurn, answerTurn]);
        if (resp.status === 503 && err.code === "maintenance") {
          showMaintenance(err.message);
          setStatus("");
        } else if (resp.status === 429) {
          setStatus("Busy, retry in " + retryAfterSeconds(resp, 5) + " s", true);
        } else if (resp.status === 401 && state.config.auth === "pasteKey") {
          state.key = "";
          setStatus("The API key was refused: paste a valid one.", true);
        } else {
          setStatus(err.message || ("The assistant could not answer (HTTP " + resp.status + "). Please try again."), true);
        }
      });
    }).catch(function () {
      if (answerTurn.getAttribute("aria-busy")) takeBack(question, [userTurn, answerTurn]);
      setStatus("The assistant could not be reached. Please try again.", true);
    }).then(function () {
      state.busy = false;
      render();
      if (!state.maintenance && !$("question").disabled) $("question").focus();
    });
  }

  function submitQuestion() {
    var question = $("question").value.trim();
    if (!question || !canAsk()) return;
    $("question").value = "";
    ask(question);
  }

  function wire() {
    $("ask-form").addEventListener("submit", function (e) { e.preventDefault(); submitQuestion(); });
    $("question").addEventListener("keydown", function (e) {
      // isComposing: Enter also confirms a Chinese/Japanese input method's candidate.
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submitQuestion(); }
    });
    $("new-chat").addEventListener("click", function () {
      state.messages = [];
      state.conversation = newConversationId();
      $("log").textContent = "";
      setStatus("New conversation.");
      render();
      $("question").focus();
    });
    $("key-form").addEventListener("submit", function (e) {
      e.preventDefault();
      state.key = $("key-input").value.trim();
      $("key-input").value = "";
      render();
      if (state.key) $("question").focus();
    });
    $("key-forget").addEventListener("click", function () {
      state.key = "";
      render();
      $("key-input").focus();
    });
  }

  function start(config) {
    state.config = config;
    document.title = config.title;
    $("title").textContent = config.title;
    $("notice").textContent = config.notice;
    $("model").textContent = "Model: " + modelLabel(config.model, config.modelVersion);
    wire();
    render();
    pollStatus().then(function () {
      document.body.setAttribute("data-ready", "true");
      if (!state.maintenance) (config.auth === "pasteKey" && !state.key ? $("key-input") : $("question")).focus();
    });
  }

  fetch("/ui/config.json", { cache: "no-store" })
    .then(function (resp) { if (!resp.ok) throw new Error(String(resp.status)); return resp.json(); })
    .then(start)
    .catch(function () { setStatus("The page could not load its settings. Reload to try again.", true); });
})();
