// Starts Swagger UI on /docs. It lives in a file rather than an inline script
// because the Content-Security-Policy allows scripts from this origin only.
window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.specUrl,
    domNode: root,
    deepLinking: true,
    // By default Swagger UI sends the spec to an online validator, so that is
    // turned off.
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
