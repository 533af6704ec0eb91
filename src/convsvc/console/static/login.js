"use strict";
// Shows why the last login failed (the reason is in the query; the token never is).
const reasons = {
  refused: "That token was refused.",
  missing: "Enter a token.",
  unavailable: "convsvc did not answer; try again.",
};
const reason = new URLSearchParams(window.location.search).get("error");
if (reason && reasons[reason]) {
  const shown = document.getElementById("login-error");
  shown.textContent = reasons[reason];
  shown.hidden = false;
}
