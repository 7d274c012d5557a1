// The test page's script (bundled by esbuild): the docs' snippet ("mds-web-snippet", an alias) and the calls.
import * as snippet from "mds-web-snippet";

import { exercise } from "./grpc_web_calls.mjs";

window.exercise = (baseUrl, apiKey, fixtures) => exercise(snippet, baseUrl, apiKey, fixtures);
