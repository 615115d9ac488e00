# `MIX_ENV=prod mix run bench/result_heartbeat.exs` (issue 23 item 10, results).
# Heartbeat delay while two callers receive 2.7M-element list<option<u8>> results 3 times each,
# against two plain processes building and keeping lists of the same length.
c = Capsid.Component.load!(Capsid.Guests.path(:bulk))
imports = %{"fetch" => fn _ -> [] end, "send" => fn _ -> 0 end}
n = 2_700_000

heartbeat = fn parent ->
  spawn_link(fn ->
    loop = fn loop, worst ->
      t = System.monotonic_time(:microsecond)

      receive do
        :stop -> send(parent, {:worst, worst})
      after
        2 ->
          late = System.monotonic_time(:microsecond) - t - 2_000
          loop.(loop, max(worst, late))
      end
    end

    loop.(loop, 0)
  end)
end

run = fn label, work ->
  hb = heartbeat.(self())
  Process.sleep(50)
  tasks = for _ <- 1..2, do: Task.async(work)
  Enum.each(tasks, &Task.await(&1, 120_000))
  send(hb, :stop)

  receive do
    {:worst, w} -> IO.puts("#{label}: heartbeat worst delay #{div(w, 1000)} ms")
  end
end

for _ <- 1..3 do
  run.("plain lists ", fn ->
    for _ <- 1..3 do
      l = Enum.map(1..n, fn i -> if rem(i, 3) == 0, do: nil, else: rem(i, 256) end)
      length(l)
    end
  end)

  run.("capsid results", fn ->
    {:ok, pid} = Capsid.Instance.start_link(component: c, imports: imports)

    for _ <- 1..3 do
      {:ok, l} = Capsid.call(pid, "options", [n], timeout: 60_000)
      length(l)
    end

    GenServer.stop(pid)
  end)
end
