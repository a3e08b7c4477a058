// Module hooks that let Node.js load the wukongimjssdk package as published.
//
// The package's `lib/` is ES module code written for bundlers (webpack resolves `./proto` to `./proto.js`
// and `.` to `./index.js`), in a package.json without "type": "module". Node.js alone refuses both, so:
// extension-less relative specifiers get `.js` (or `/index.js`), and the SDK's files load as ES modules.
export async function resolve(specifier, context, nextResolve) {
  try {
    return await nextResolve(specifier, context);
  } catch (error) {
    const relative = specifier === "." || specifier === ".." || specifier.startsWith("./") || specifier.startsWith("../");
    if (!relative || specifier.endsWith(".js")) {
      throw error;
    }
    const directory = specifier === "." || specifier === ".." || specifier.endsWith("/");
    const file = directory ? `${specifier.replace(/\/?$/, "/")}index.js` : `${specifier}.js`;
    return nextResolve(file, context);
  }
}

export async function load(url, context, nextLoad) {
  if (url.includes("/node_modules/wukongimjssdk/lib/")) {
    return nextLoad(url, { ...context, format: "module" });
  }
  return nextLoad(url, context);
}
