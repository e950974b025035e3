#!/usr/bin/env node
'use strict';
// node infer.js <gateway host:port> <api key> [--model demo] [--input '[[...], ...]'] [--tls]
//
// Asks the gateway whether it is ready, sends one FP32 batch to the model and prints the reply as
// JSON on stdout. A gRPC error prints `<STATUS>: <details>` on stderr and exits with 1.

const { GatewayClient, grpcStatusName } = require('./client');

// The row `aiaas up` prints for `aiaas predict demo`.
const DEMO_ROW = [0.5, -1.2, 0.3, 0.9, -0.4, 1.1, 0.0, -0.7, 0.2, 0.8];
const USAGE = "usage: node infer.js <gateway host:port> <api key> [--model demo] [--input '[[...]]'] "
  + '[--input-name INPUT0] [--tls]';

function parseArgs(argv) {
  const options = { model: 'demo', inputName: 'INPUT0', rows: [DEMO_ROW], tls: false };
  const positional = [];
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg === '--tls') options.tls = true;
    else if (arg === '--model') options.model = argv[(i += 1)];
    else if (arg === '--input-name') options.inputName = argv[(i += 1)];
    else if (arg === '--input') options.rows = JSON.parse(argv[(i += 1)]);
    else if (arg.startsWith('--')) throw new Error(`unknown option ${arg}\n${USAGE}`);
    else positional.push(arg);
  }
  if (positional.length !== 2) throw new Error(USAGE);
  [options.address, options.apiKey] = positional;
  const width = options.rows[0] && options.rows[0].length;
  if (!width || !options.rows.every((row) => Array.isArray(row) && row.length === width)) {
    throw new Error('--input must be a non-empty list of rows of one length');
  }
  return options;
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const client = new GatewayClient(options.address, options.apiKey, { tls: options.tls });
  try {
    const ready = await client.serverReady();
    const reply = await client.infer(options.model, [{
      name: options.inputName,
      datatype: 'FP32',
      shape: [options.rows.length, options.rows[0].length],
      data: options.rows.flat(),
    }]);
    process.stdout.write(`${JSON.stringify({ ready, ...reply })}\n`);
  } finally {
    client.close();
  }
}

main().catch((error) => {
  const status = error.code !== undefined ? grpcStatusName(error.code) : undefined;
  process.stderr.write(status ? `${status}: ${error.details}\n` : `${error.message}\n`);
  process.exitCode = 1;
});
