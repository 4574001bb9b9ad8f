// The docs page's script (a file, not inline: the page's Content-Security-Policy allows scripts from
// this origin only). It loads /openapi.json, makes the relative example dates concrete, and starts
// Swagger UI on it.
"use strict";

// The document is static, so an example such as a code's expires_at cannot say "in 30 days" as a
// date: the plugin writes a far-future placeholder and `x-example-days-from-now`; here it becomes the
// date that many days after the page was opened, so "Try it out" sends a value the server accepts.
const DAYS_FROM_NOW = "x-example-days-from-now";

function daysFromNow(days) {
  const date = new Date(Date.now() + days * 86400 * 1000);
  date.setUTCMilliseconds(0);
  return date.toISOString().replace(".000Z", "Z");
}

function concreteExamples(node) {
  if (Array.isArray(node)) {
    node.forEach(concreteExamples);
    return;
  }
  if (node === null || typeof node !== "object") {
    return;
  }
  const relative = node[DAYS_FROM_NOW];
  if (typeof relative === "number") {
    // A schema property: its own examples.
    node.examples = [daysFromNow(relative)];
  } else if (relative && typeof relative === "object" && node.example) {
    // A request body: the named fields of its example.
    for (const [field, days] of Object.entries(relative)) {
      node.example[field] = daysFromNow(days);
    }
  }
  Object.values(node).forEach(concreteExamples);
}

fetch("/openapi.json")
  .then((response) => response.json())
  .then((spec) => {
    concreteExamples(spec);
    window.ui = SwaggerUIBundle({
      spec: spec,
      dom_id: "#swagger-ui",
      deepLinking: true,
      // The bearer token lives only as long as the page: never stored across page loads.
      persistAuthorization: false,
      // The public validator badge would call out to the internet.
      validatorUrl: null,
      presets: [SwaggerUIBundle.presets.apis],
      layout: "BaseLayout",
    });
  });
