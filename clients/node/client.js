'use strict';
// The gateway from Node.js: `inference.GRPCInferenceService` (the KServe v2 / Triton protocol the
// gateway speaks), with the API key sent as `authorization: Bearer <key>` on every call.
//
// The stubs are built from the vendored Triton protos by @grpc/proto-loader at load time; for
// ahead-of-time stubs in other languages see protos/README.md.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.join(__dirname, 'protos');

// Tensor element codecs for raw_input_contents / raw_output_contents: little-endian, packed.
// BYTES (length-prefixed strings) is left out: the demo and this example send numbers.
const CODECS = {
  BOOL: { size: 1, read: (b, o) => b.readUInt8(o) !== 0, write: (b, v, o) => b.writeUInt8(v ? 1 : 0, o) },
  UINT8: { size: 1, read: (b, o) => b.readUInt8(o), write: (b, v, o) => b.writeUInt8(v, o) },
  INT8: { size: 1, read: (b, o) => b.readInt8(o), write: (b, v, o) => b.writeInt8(v, o) },
  INT32: { size: 4, read: (b, o) => b.readInt32LE(o), write: (b, v, o) => b.writeInt32LE(v, o) },
  // JSON has no 64-bit integers: values past 2**53 lose precision, as they would in JavaScript.
  INT64: {
    size: 8,
    read: (b, o) => Number(b.readBigInt64LE(o)),
    write: (b, v, o) => b.writeBigInt64LE(BigInt(v), o),
  },
  FP32: { size: 4, read: (b, o) => b.readFloatLE(o), write: (b, v, o) => b.writeFloatLE(v, o) },
  FP64: { size: 8, read: (b, o) => b.readDoubleLE(o), write: (b, v, o) => b.writeDoubleLE(v, o) },
};

function codecFor(datatype) {
  const codec = CODECS[datatype];
  if (!codec) {
    throw new Error(`datatype ${datatype} is not supported here (supported: ${Object.keys(CODECS).join(', ')})`);
  }
  return codec;
}

/** Pack a flat array of numbers as one raw tensor. */
function encodeTensor(datatype, values) {
  const codec = codecFor(datatype);
  const buffer = Buffer.alloc(values.length * codec.size);
  values.forEach((v, i) => codec.write(buffer, v, i * codec.size));
  return buffer;
}

/** Unpack one raw tensor into a flat array. */
function decodeTensor(datatype, buffer) {
  const codec = codecFor(datatype);
  if (buffer.length % codec.size !== 0) {
    throw new Error(`${buffer.length} bytes is not a whole number of ${datatype} elements`);
  }
  const values = new Array(buffer.length / codec.size);
  for (let i = 0; i < values.length; i += 1) {
    values[i] = codec.read(buffer, i * codec.size);
  }
  return values;
}

const CONTENTS_FIELD = {
  BOOL: 'bool_contents', UINT8: 'uint_contents', INT8: 'int_contents', INT32: 'int_contents',
  INT64: 'int64_contents', FP32: 'fp32_contents', FP64: 'fp64_contents',
};

function typedContents(tensor) {
  const field = CONTENTS_FIELD[tensor.datatype];
  if (!field || !tensor.contents) {
    throw new Error(`output ${tensor.name} (${tensor.datatype}) came with no data this client can read`);
  }
  return tensor.contents[field].map((v) => (typeof v === 'boolean' ? v : Number(v)));
}

function loadService() {
  const definition = protoLoader.loadSync('grpc_service.proto', {
    includeDirs: [PROTO_DIR],
    keepCase: true, // field names as in the proto: raw_input_contents, model_version
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).inference.GRPCInferenceService;
}

/** A connection to the gateway; every call carries the API key and a deadline. */
class GatewayClient {
  /**
   * @param {string} address host:port of the gateway
   * @param {string} apiKey a key from `aiaas keys create` (or the bootstrap admin key)
   * @param {{tls?: boolean, timeoutMs?: number}} options TLS for a gateway off loopback
   */
  constructor(address, apiKey, { tls = false, timeoutMs = 10000 } = {}) {
    const Service = loadService();
    const credentials = tls ? grpc.credentials.createSsl() : grpc.credentials.createInsecure();
    this.stub = new Service(address, credentials);
    this.apiKey = apiKey;
    this.timeoutMs = timeoutMs;
  }

  call(method, request) {
    const metadata = new grpc.Metadata();
    if (this.apiKey) {
      metadata.set('authorization', `Bearer ${this.apiKey}`);
    }
    const deadline = new Date(Date.now() + this.timeoutMs);
    return new Promise((resolve, reject) => {
      this.stub[method](request, metadata, { deadline }, (error, reply) => (error ? reject(error) : resolve(reply)));
    });
  }

  async serverReady() {
    return (await this.call('ServerReady', {})).ready;
  }

  /**
   * One inference.
   * @param {string} model model name (an alias is picked by the gateway's routes)
   * @param {{name: string, datatype: string, shape: number[], data: number[]}[]} inputs flat row-major data
   * @param {string} version '' for the gateway's choice, or a version number as a string
   * @returns {Promise<{model: string, version: string, outputs: Object<string, {datatype: string, shape: number[], data: number[]}>}>}
   */
  async infer(model, inputs, version = '') {
    const reply = await this.call('ModelInfer', {
      model_name: model,
      model_version: version,
      inputs: inputs.map(({ name, datatype, shape }) => ({ name, datatype, shape })),
      raw_input_contents: inputs.map(({ datatype, data }) => encodeTensor(datatype, data)),
    });
    const outputs = {};
    reply.outputs.forEach((tensor, i) => {
      const raw = reply.raw_output_contents[i];
      outputs[tensor.name] = {
        datatype: tensor.datatype,
        shape: tensor.shape.map(Number),
        // A server may answer in typed `contents` instead of raw bytes; both are valid v2 replies.
        data: raw ? decodeTensor(tensor.datatype, raw) : typedContents(tensor),
      };
    });
    return { model: reply.model_name, version: reply.model_version, outputs };
  }

  close() {
    this.stub.close();
  }
}

module.exports = { GatewayClient, encodeTensor, decodeTensor, grpcStatusName: (code) => grpc.status[code] };
