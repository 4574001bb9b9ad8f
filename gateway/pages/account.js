// The password-reset and email-verification page: reads the token from the link, posts it to the REST
// API on this origin, and says what happened in words (the error reasons of referral.v1.ErrorReason).
"use strict";

// What each reason these two calls can answer with means to the person holding the link.
const REASONS = {
  RESET_TOKEN_INVALID:
    "This reset link is invalid, has expired or was already used. Ask for a new one from the sign-in page.",
  VERIFICATION_TOKEN_INVALID:
    "This confirmation link is invalid, has expired, was replaced by a newer one or was already used. " +
    "Ask for a new confirmation email.",
  FIELD_REQUIRED: "This link is incomplete: open it again from the email.",
  FIELD_TOO_LONG: "This link is not valid: open it again from the email.",
  FIELD_INVALID: "This link is not valid: open it again from the email.",
  PASSWORD_TOO_SHORT: "The password is too short: use at least 8 characters.",
  PASSWORD_TOO_LONG: "The password is too long: use at most 128 characters.",
  PASSWORD_TOO_COMMON: "This password is one of the most common ones: choose another one.",
  PASSWORD_INVALID: "The password contains characters a password may not contain, or only spaces.",
  CONCURRENT_UPDATE: "Your password was changed at the same moment from elsewhere: try again.",
  TOO_MANY_ATTEMPTS: "Too many attempts: wait a little and try again.",
  RATE_LIMITED: "Too many attempts from this network: wait a little and try again.",
  SERVER_OVERLOADED: "The service is busy: try again in a moment.",
  DATABASE_BUSY: "The service is busy: try again in a moment.",
  DATABASE_UNAVAILABLE: "The service is unavailable right now: try again in a moment.",
  DEADLINE_EXCEEDED: "The service took too long to answer: try again.",
};
const GENERIC = "Something went wrong: try again in a moment.";

const PAGES = {
  "/reset-password": { form: "reset-password", submit: "reset-submit" },
  "/verify-email": { form: "verify-email", submit: "verify-submit" },
};

function show(text, kind) {
  const message = document.getElementById("message");
  message.textContent = text;
  message.className = kind;
}

// The words for a google.rpc.Status body: its ErrorInfo reason, and the seconds RetryInfo asks for.
function describe(status) {
  const details = (status && status.details) || [];
  const info = details.find((d) => d["@type"] === "type.googleapis.com/google.rpc.ErrorInfo");
  const retry = details.find((d) => d["@type"] === "type.googleapis.com/google.rpc.RetryInfo");
  let text = (info && REASONS[info.reason]) || GENERIC;
  const seconds = retry && parseFloat(retry.retry_delay);
  if (seconds > 0) {
    text += ` (about ${Math.ceil(seconds)} s)`;
  }
  return text;
}

async function post(path, body) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (error) {
    return { ok: false, text: "The service cannot be reached: check your connection and try again." };
  }
  let json = null;
  try {
    json = await response.json();
  } catch (error) {
    json = null;
  }
  return response.ok ? { ok: true, json: json } : { ok: false, text: describe(json) };
}

function start() {
  const page = PAGES[window.location.pathname];
  if (!page) {
    return;
  }
  const token = new URLSearchParams(window.location.search).get("token") || "";
  // Out of the address bar and the history, now that the page holds it.
  window.history.replaceState(null, "", window.location.pathname);
  const form = document.getElementById(page.form);
  const submit = document.getElementById(page.submit);
  form.hidden = false;
  if (!token) {
    show("This link has no token: open it again from the email.", "error");
    submit.disabled = true;
    return;
  }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    let result;
    if (page.form === "reset-password") {
      const password = document.getElementById("new-password").value;
      if (password !== document.getElementById("repeat-password").value) {
        show("The two passwords differ: type the same password twice.", "error");
        return;
      }
      submit.disabled = true;
      result = await post("/auth/reset_password/confirm", { token: token, new_password: password });
      if (result.ok) {
        show("Your password has been changed. You can now sign in with it.", "success");
        form.hidden = true;
        return;
      }
    } else {
      submit.disabled = true;
      result = await post("/auth/verify_email", { token: token });
      if (result.ok) {
        show("Thank you: your email address is confirmed.", "success");
        form.hidden = true;
        return;
      }
    }
    submit.disabled = false;
    show(result.text, "error");
  });
}

start();
