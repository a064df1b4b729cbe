// An independent reflection client (Node: @grpc/grpc-js + grpc-reflection-js), the way grpcurl
// works: it knows no .proto file, asks the server's reflection service for the descriptors, and
// calls the API with what it learnt. Run by reflection_js_test.cc against a real server:
//
//   node reflection_client.js HOST:PORT TOKEN
//
// Prints one line per check and exits 0 when all pass, 1 otherwise.
'use strict';
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { Client } = require('grpc-reflection-js');

const [address, token] = process.argv.slice(2);
let failures = 0;
function check(ok, what) {
  console.log(`${ok ? 'ok' : 'FAIL'} ${what}`);
  if (!ok) failures++;
}

// A service stub built from the descriptors reflection returns for `symbol`.
async function stubFor(reflection, symbol) {
  const root = await reflection.fileContainingSymbol(symbol);
  const def = protoLoader.fromJSON(root.toJSON(), { keepCase: true, defaults: true, enums: String, longs: String });
  const ctor = symbol.split('.').reduce((o, k) => o[k], grpc.loadPackageDefinition(def));
  return new ctor(address, grpc.credentials.createInsecure());
}

function call(stub, method, request, metadata) {
  return new Promise((resolve) => {
    stub[method](request, metadata || new grpc.Metadata(), { deadline: Date.now() + 10000 },
                 (err, reply) => resolve({ err, reply }));
  });
}

async function main() {
  const reflection = new Client(address, grpc.credentials.createInsecure());
  const services = await reflection.listServices();
  for (const s of ['perfusion.v1.TrainingService', 'perfusion.v1.ConceptService',
                   'perfusion.v1.GenerationService', 'grpc.health.v1.Health']) {
    check(services.includes(s), `reflection lists ${s}`);
  }

  const health = await stubFor(reflection, 'grpc.health.v1.Health');
  let r = await call(health, 'Check', { service: '' });
  check(!r.err && r.reply.status === 'SERVING', `Health/Check: ${r.err ? r.err.message : r.reply.status}`);

  const auth = new grpc.Metadata();
  auth.set('authorization', `Bearer ${token}`);
  const concepts = await stubFor(reflection, 'perfusion.v1.ConceptService');
  r = await call(concepts, 'ListConcepts', { page_size: 10 }, auth);
  check(!r.err && Array.isArray(r.reply.concepts), `ListConcepts: ${r.err ? r.err.message : r.reply.concepts.length + ' concepts'}`);
  r = await call(concepts, 'GetConcept', { id: 'cpt_0000000000000000' }, auth);
  check(r.err && r.err.code === grpc.status.NOT_FOUND, `GetConcept of an unknown id: ${r.err ? r.err.code + ' ' + r.err.details : 'no error'}`);
  r = await call(concepts, 'ListConcepts', { page_size: 10 });
  check(r.err && r.err.code === grpc.status.UNAUTHENTICATED, `ListConcepts without a token: ${r.err ? r.err.code : 'no error'}`);

  const training = await stubFor(reflection, 'perfusion.v1.TrainingService');
  r = await call(training, 'CreateTrainingJob', { concept_name: 'teddy', superclass: 'dog' }, auth);
  check(r.err && r.err.code === grpc.status.INVALID_ARGUMENT && /^images/.test(r.err.details),
        `CreateTrainingJob without images: ${r.err ? r.err.code + ' ' + r.err.details : 'no error'}`);
}

main().then(() => process.exit(failures ? 1 : 0), (e) => {
  console.log(`FAIL ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
