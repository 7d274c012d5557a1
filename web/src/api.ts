/** The server through Envoy: gRPC-Web clients on the page's origin, with the API key (if any) from session storage. */
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

import { GRPCInferenceService } from "../../gen/ts/mds/oip/grpc_service_pb.js";
import { InferenceService } from "../../gen/ts/mds/v1/inference_service_pb.js";
import { JobService } from "../../gen/ts/mds/v1/job_service_pb.js";
import { ModelService } from "../../gen/ts/mds/v1/model_service_pb.js";
import { $, say } from "./dom.js";

const KEY = "mds-api-key";

/** The `authorization` header value for the stored key (api/auth.py: "Bearer mds_<id>_<secret>"), or "". */
export function authorization(): string {
  const key = sessionStorage.getItem(KEY);
  return key ? `Bearer ${key}` : "";
}

const withKey: Interceptor = (next) => async (request) => {
  if (authorization()) request.header.set("authorization", authorization());
  return next(request);
};

const transport = createGrpcWebTransport({ baseUrl: location.origin, interceptors: [withKey] });
export const models = createClient(ModelService, transport);
export const inference = createClient(InferenceService, transport);
export const jobs = createClient(JobService, transport);
export const v2 = createClient(GRPCInferenceService, transport);

/** Asks for an API key in the page's dialog; resolves once one is stored. */
function askForKey(why: string): Promise<void> {
  const dialog = $<HTMLDialogElement>("#key-dialog");
  $("#key-reason").textContent = why;
  if (!dialog.open) dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        const key = $<HTMLInputElement>("#key").value.trim().replace(/^bearer\s+/i, "");
        if (key) sessionStorage.setItem(KEY, key);
        resolve();
      },
      { once: true },
    );
  });
}

/** Runs `call`; asks for a key and tries again while the server says UNAUTHENTICATED. Other errors go to the status line and are rethrown. */
export async function withAuth<T>(call: () => Promise<T>): Promise<T> {
  for (;;) {
    try {
      return await call();
    } catch (error) {
      const e = ConnectError.from(error);
      if (e.code === Code.Unauthenticated) {
        await askForKey(e.rawMessage);
        continue;
      }
      const name = Code[e.code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase(); // as gRPC names it: INVALID_ARGUMENT
      if (e.code !== Code.Canceled) say(`${name}: ${e.rawMessage}`, true);
      throw e;
    }
  }
}
