#!/usr/bin/env node
// Runs the TypeScript sources from the checkout, compiled on demand (see compile.js).
import { compile } from "./compile.js";

process.setSourceMapsEnabled(true);
await import(await compile());
