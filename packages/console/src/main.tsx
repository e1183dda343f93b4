import { StrictMode, useEffect, useState } from "react";
import { createRoot } from "react-dom/client";
import "@xterm/xterm/css/xterm.css";
import "./styles.css";
import { session } from "./api.ts";
import { ImagesPage } from "./pages/Images.tsx";
import { SignIn } from "./pages/SignIn.tsx";
import { VmCreate } from "./pages/VmCreate.tsx";
import { VmDetail } from "./pages/VmDetail.tsx";
import { VmList } from "./pages/VmList.tsx";
import { VolumesPage } from "./pages/Volumes.tsx";

/** Hash routes (#/vms, #/vms/new, #/vms/{id}, #/vms/{id}/terminal, #/images, #/volumes): the server serves one index.html. */
function useRoute(): string[] {
  const read = () => location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  const [route, setRoute] = useState(read);
  useEffect(() => {
    const onChange = () => setRoute(read());
    window.addEventListener("hashchange", onChange);
    return () => window.removeEventListener("hashchange", onChange);
  }, []);
  return route;
}

function App() {
  const [key, setKey] = useState(session.get());
  const route = useRoute();
  useEffect(() => {
    const onUnauthorized = () => {
      session.clear();
      setKey("");
    };
    window.addEventListener("cocoon:unauthorized", onUnauthorized);
    return () => window.removeEventListener("cocoon:unauthorized", onUnauthorized);
  }, []);

  if (!key) return <SignIn onSignIn={(k) => (session.set(k), setKey(k))} />;

  const [section, id, sub] = route;
  let page;
  if (section === "images") page = <ImagesPage selected={id} />;
  else if (section === "volumes") page = <VolumesPage />;
  else if (section === "vms" && id === "new") page = <VmCreate image={sub} />;
  else if (section === "vms" && id) page = <VmDetail id={id} tab={sub ?? "overview"} />;
  else page = <VmList />;

  return (
    <>
      <a className="skip" href="#main" onClick={(e) => (e.preventDefault(), document.getElementById("main")?.focus())}>
        Skip to content
      </a>
      <header className="topbar">
        <a className="brand" href="#/vms">
          Cocoon
        </a>
        <nav aria-label="Main">
          <a href="#/vms" aria-current={section !== "images" && section !== "volumes" ? "page" : undefined}>
            MicroVMs
          </a>
          <a href="#/images" aria-current={section === "images" ? "page" : undefined}>
            Images
          </a>
          <a href="#/volumes" aria-current={section === "volumes" ? "page" : undefined}>
            Volumes
          </a>
        </nav>
        <button
          type="button"
          className="link"
          onClick={() => {
            session.clear();
            setKey("");
          }}
        >
          Sign out
        </button>
      </header>
      <main id="main" tabIndex={-1}>
        {page}
      </main>
    </>
  );
}

createRoot(document.getElementById("root")!).render(
  <StrictMode>
    <App />
  </StrictMode>,
);
