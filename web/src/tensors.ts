/** Tensors to and from what a person reads and types: JSON values in, flat value lists out. */
import type { MessageInitShape } from "@bufbuild/protobuf";

import { DataType, type Tensor, type TensorSchema, type TensorSpec } from "../../gen/ts/mds/v1/tensor_pb.js";

type Field = "boolContents" | "intContents" | "int64Contents" | "uintContents" | "uint64Contents" | "fp32Contents" | "fp64Contents" | "bytesContents";
type Value = number | string | boolean;

const FIELDS: Partial<Record<DataType, Field>> = {
  [DataType.BOOL]: "boolContents",
  [DataType.INT8]: "intContents",
  [DataType.INT16]: "intContents",
  [DataType.INT32]: "intContents",
  [DataType.INT64]: "int64Contents",
  [DataType.UINT8]: "uintContents",
  [DataType.UINT16]: "uintContents",
  [DataType.UINT32]: "uintContents",
  [DataType.UINT64]: "uint64Contents",
  [DataType.FP32]: "fp32Contents",
  [DataType.FP64]: "fp64Contents",
  [DataType.STRING]: "bytesContents",
};

/** "FP32 [n, 8]": a tensor spec as the pages show it (symbolic dimensions by name, else "?"). */
export function describe(spec: { dtype: DataType; shape: bigint[]; dimNames?: string[]; onnxType?: string }): string {
  if (spec.dtype === DataType.UNSPECIFIED) return spec.onnxType ?? "?";
  const dims = spec.shape.map((d, i) => (d >= 0n ? String(d) : spec.dimNames?.[i] || "?"));
  return `${DataType[spec.dtype]} [${dims.join(", ")}]`;
}

/** The input tensor for `spec` from JSON text: a number or string, or nested arrays of them (the nesting is the shape). */
export function fromJson(spec: TensorSpec, text: string): MessageInitShape<typeof TensorSchema> {
  const field = FIELDS[spec.dtype];
  if (!field) throw new Error(`${spec.name}: the form cannot send ${describe(spec)} inputs; use the API`);
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw new Error(`${spec.name}: not JSON (expected a number or nested arrays such as [[1, 2], [3, 4]])`);
  }
  const shape: number[] = [];
  for (let level = value; Array.isArray(level); level = level[0]) shape.push(level.length);
  const flat = (Array.isArray(value) ? value.flat(shape.length) : [value]) as Value[];
  if (flat.length !== shape.reduce((a, b) => a * b, 1) || flat.some((v) => Array.isArray(v))) {
    throw new Error(`${spec.name}: ragged array; every row needs the same length`);
  }
  const encode = new TextEncoder();
  const convert: (v: Value) => unknown =
    field === "int64Contents" || field === "uint64Contents" ? (v) => BigInt(v)
    : field === "bytesContents" ? (v) => encode.encode(String(v))
    : field === "boolContents" ? (v) => Boolean(v)
    : (v) => Number(v);
  return { name: spec.name, dtype: spec.dtype, shape: shape.map(BigInt), contents: { [field]: flat.map(convert) } };
}

/** An IEEE half (or bfloat16, `brain`) from its 16 bits. */
function half(bits: number, brain: boolean): number {
  if (brain) return new Float32Array(new Uint32Array([bits << 16]).buffer)[0];
  const exp = (bits >> 10) & 31, frac = bits & 1023, sign = bits & 0x8000 ? -1 : 1;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (exp ? 2 ** (exp - 15) * (1 + frac / 1024) : 2 ** -14 * (frac / 1024));
}

const RAW: Partial<Record<DataType, [number, (v: DataView, at: number) => Value]>> = {
  [DataType.BOOL]: [1, (v, at) => v.getUint8(at) !== 0],
  [DataType.UINT8]: [1, (v, at) => v.getUint8(at)],
  [DataType.INT8]: [1, (v, at) => v.getInt8(at)],
  [DataType.UINT16]: [2, (v, at) => v.getUint16(at, true)],
  [DataType.INT16]: [2, (v, at) => v.getInt16(at, true)],
  [DataType.UINT32]: [4, (v, at) => v.getUint32(at, true)],
  [DataType.INT32]: [4, (v, at) => v.getInt32(at, true)],
  [DataType.UINT64]: [8, (v, at) => String(v.getBigUint64(at, true))],
  [DataType.INT64]: [8, (v, at) => String(v.getBigInt64(at, true))],
  [DataType.FP16]: [2, (v, at) => half(v.getUint16(at, true), false)],
  [DataType.BF16]: [2, (v, at) => half(v.getUint16(at, true), true)],
  [DataType.FP32]: [4, (v, at) => v.getFloat32(at, true)],
  [DataType.FP64]: [8, (v, at) => v.getFloat64(at, true)],
};

/** A tensor's values, flat and row-major (64-bit integers as strings, so that none loses digits). */
export function valuesOf(tensor: Tensor): Value[] {
  if (tensor.rawData.length) {
    const [size, read] = RAW[tensor.dtype]!;
    const view = new DataView(tensor.rawData.buffer, tensor.rawData.byteOffset, tensor.rawData.byteLength);
    return Array.from({ length: tensor.rawData.length / size }, (_, i) => read(view, i * size));
  }
  const decode = new TextDecoder();
  const field = FIELDS[tensor.dtype];
  const list = (field ? tensor.contents?.[field] : []) ?? [];
  return Array.from(list as Iterable<unknown>, (v) =>
    typeof v === "bigint" ? String(v) : v instanceof Uint8Array ? decode.decode(v) : (v as Value),
  );
}
