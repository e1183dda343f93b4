import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

// Built into dist/ and served by `cocoon server` under /console/ (src/api/routes/console.ts).
// Everything is bundled: the console fetches nothing but the server's own API.
export default defineConfig({
  base: "/console/",
  plugins: [react()],
  build: { outDir: "dist", emptyOutDir: true, chunkSizeWarningLimit: 2000 },
});
