// `node --import ./register.mjs`: install esm_hooks.mjs before the driver imports the SDK.
import { register } from "node:module";

register("./esm_hooks.mjs", import.meta.url);
