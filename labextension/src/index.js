// remotemagic: put each `%%ec2 run` cell's output back into that cell when the notebook is
// (re)opened, and keep it live while the job runs. The Jupyter server extension renders the
// job's event log (the local mirror) into nbformat outputs per cell id; this plugin only asks
// for them and replaces the outputs of the matching cell. It never touches a cell's source,
// leaves alone a cell that no longer starts with `%%ec2 run` or that this page is running, and
// leaves a cell to the kernel while the page that started the job shows it (until it detaches).
import { INotebookTracker } from '@jupyterlab/notebook';
import { ServerConnection } from '@jupyterlab/services';
import { URLExt } from '@jupyterlab/coreutils';

const POLL_RUNNING_MS = 400;
const POLL_IDLE_MS = 5000;

function findCell(model, cellId) {
  const cells = model.cells;
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.id === cellId) {
      return cell;
    }
  }
  return null;
}

function setOutputs(cell, outputs) {
  cell.outputs.clear();
  for (const output of outputs) {
    cell.outputs.add(output);
  }
}

function watch(panel) {
  const settings = ServerConnection.makeSettings();
  const applied = new Map(); // cell id -> {job, offset} last put into the cell
  let stopped = false;
  let timer = null;
  panel.disposed.connect(() => {
    stopped = true;
    clearTimeout(timer);
  });

  async function tick() {
    let delay = POLL_IDLE_MS;
    try {
      const model = panel.content.model;
      const have = [...applied.values()].map(a => `${a.job}:${a.offset}`).join(',');
      const query = new URLSearchParams({ path: panel.context.path, have });
      const url = URLExt.join(settings.baseUrl, 'remotemagic/cells') + '?' + query.toString();
      const resp = await ServerConnection.makeRequest(url, {}, settings);
      if (resp.ok && model) {
        const body = await resp.json();
        const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
        const myClient = kernel ? kernel.clientId : null;
        let running = false;
        for (const [cellId, view] of Object.entries(body.cells)) {
          if (!view.finished) {
            running = true;
          }
          if (view.client && view.client === myClient && !view.detached) {
            continue; // this very page started it: the kernel shows it live
          }
          const prev = applied.get(cellId);
          if (prev && prev.job === view.job && prev.offset === view.offset) {
            continue;
          }
          if (!view.outputs) {
            continue;
          }
          const cell = findCell(model, cellId);
          if (!cell || cell.type !== 'code') {
            continue;
          }
          if (!cell.sharedModel.getSource().trimStart().startsWith(body.prefix)) {
            continue; // the cell was changed since: what is in it now is the user's
          }
          if (cell.executionState === 'running') {
            continue; // being run again from this page
          }
          setOutputs(cell, view.outputs);
          applied.set(cellId, { job: view.job, offset: view.offset });
        }
        delay = running ? POLL_RUNNING_MS : POLL_IDLE_MS;
      }
    } catch (err) {
      console.warn('remotemagic: could not refresh cell outputs', err);
    }
    if (!stopped) {
      timer = setTimeout(tick, delay);
    }
  }

  panel.context.ready.then(tick);
}

const plugin = {
  id: 'remotemagic:cell-outputs',
  description: "Puts a remotemagic job's output back into the cell that started it, live.",
  autoStart: true,
  requires: [INotebookTracker],
  activate: (app, tracker) => {
    tracker.widgetAdded.connect((_, panel) => watch(panel));
    tracker.forEach(panel => watch(panel));
  }
};

export default plugin;
