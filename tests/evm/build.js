#!/usr/bin/env node
// Regenerate tokens.json from Tokens.sol with solc from npm (package.json pins it):
//   npm ci && node tests/evm/build.js
// The tests read tokens.json only; they never compile.
'use strict';
const fs = require('fs');
const path = require('path');
const solc = require('solc');

const source = fs.readFileSync(path.join(__dirname, 'Tokens.sol'), 'utf8');
const input = {
  language: 'Solidity',
  sources: { 'Tokens.sol': { content: source } },
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: 'cancun',
    outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object'] } },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === 'error');
if (errors.length) {
  for (const e of errors) console.error(e.formattedMessage);
  process.exit(1);
}
const contracts = {};
for (const [name, contract] of Object.entries(output.contracts['Tokens.sol'])) {
  contracts[name] = { abi: contract.abi, bytecode: '0x' + contract.evm.bytecode.object };
}
const result = {
  compiler: 'solc ' + solc.version(),
  settings: input.settings,
  source_sha256: require('crypto').createHash('sha256').update(source).digest('hex'),
  contracts,
};
fs.writeFileSync(path.join(__dirname, 'tokens.json'), JSON.stringify(result, null, 1) + '\n');
console.log(`tokens.json: ${Object.keys(contracts).join(', ')} compiled by ${result.compiler}`);
