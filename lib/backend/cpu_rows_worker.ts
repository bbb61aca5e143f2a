// A worker thread of RowThreads (cpu_rows.ts): runs the rows it is handed and counts
// them done in the shared status, where the blocked main thread waits.

import { workerData } from "node:worker_threads";
import { type RowJob, rowKernels } from "./cpu_rows.ts";

const { status, port } = workerData as { status: Int32Array; port: MessagePort };

port.onmessage = ({ data: job }: MessageEvent<RowJob>) => {
  try {
    (rowKernels[job.kernel] as (a: unknown, r0: number, r1: number) => void)(
      job.args,
      job.r0,
      job.r1,
    );
  } catch (e) {
    // The first failure's message goes to the main thread, which throws it.
    if (Atomics.compareExchange(status, 3, 0, 1) === 0) {
      const bytes = new TextEncoder().encode(String(e instanceof Error ? e.stack : e));
      const room = new Uint8Array(status.buffer, 16, status.byteLength - 16);
      room.set(bytes.subarray(0, room.length));
      Atomics.store(status, 2, Math.min(bytes.length, room.length));
    }
  }
  Atomics.add(status, 0, 1);
  Atomics.notify(status, 0);
};

Atomics.add(status, 1, 1);
Atomics.notify(status, 1);
