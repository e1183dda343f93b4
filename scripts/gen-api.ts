// `npm run gen:api`: regenerates packages/sdk/src/api.gen.ts from the server's OpenAPI document.
import { writeFile } from "node:fs/promises";
import { API_TYPES_FILE, generateApiTypes } from "./api-types.ts";

await writeFile(API_TYPES_FILE, await generateApiTypes());
console.log(`wrote ${API_TYPES_FILE}`);
// The throwaway engine's timers would keep the process alive.
process.exit(0);
