defmodule Capsid.Call do
  @moduledoc false
  # The call path of `Capsid.call/4`, mirroring host_nif/src/call.rs.
  #
  # A call runs in the calling process. `Native.call_start` finds the target
  # (pid, name, pool, deployment), converts the arguments, takes the turn and
  # runs the guest for at most one epoch tick. Most calls end there. Otherwise
  # it answers how to go on, and this loop does so:
  #
  #   {:yield, ref}                   poll again
  #   {:dirty, ref}                   poll again from a dirty scheduler (data too
  #                                   large to convert on a normal one)
  #   :dirty_start                    start again from a dirty scheduler
  #   {:wait, ref, id, ms}            a WASI timer: wait for {:capsid_wake, id}
  #   {:import, ref, token, ms}       the caller's import runner runs the
  #                                   import (taking its arguments from the
  #                                   NIF and answering it there), then poll
  #   {:inline_import, ref, token, ms, fun, args}
  #                                   the same, in this process (`inline: true`),
  #                                   answered with `import_answer_resume`
  #   {:inline_import, ref, token, ms}
  #                                   the same, arguments to take first
  #   {:queued, ref, id, ms}          wait for {:capsid_turn, id}, then start
  #   :retired                        the target was replaced: look it up again
  #   :not_found                      not a local Capsid target: a pid of
  #                                   another node, or a deployment held by
  #                                   other nodes of the cluster
  #                                   (`Capsid.Cluster`)
  #
  # Nothing here raises once the NIF holds a turn for this process: a raise
  # would leave the instance owned. Any exception on the slow path cancels
  # the call before it propagates.

  alias Capsid.{Error, Imports, Native, Telemetry, Trap}

  @retries 5

  @doc false
  def call(target, function, args, opts) do
    {narrow, queue_timeout} = options!(opts)

    if Telemetry.enabled?() do
      observed(target, function, fn -> run(target, function, args, narrow, queue_timeout, opts) end)
    else
      # The common case, a call that ends in its first step, without
      # building the slow path's context (a visible share of a trivial call).
      case Native.call_start(target, function, args, narrow) do
        {:ok, value, _fuel} ->
          {:ok, value}

        status ->
          ctx = context(target, function, args, narrow, queue_timeout, opts)
          status |> started(ctx) |> elem(0)
      end
    end
  end

  @doc false
  # A call sent by `caller` on another node (`Capsid.Cluster.serve/5`): it
  # runs here or not at all. Returns `{result, fuel_used}`, or `:elsewhere`
  # when `target` is not on this node (the caller then tries another one).
  def call_here(caller, target, function, args, opts) do
    {narrow, queue_timeout} = options!(opts)
    run(target, function, args, narrow, queue_timeout, {:here, caller})
  end

  @doc false
  # A call that must not lose the instance's state even if it traps: its
  # memories are copied first and put back into its next store (used to
  # take a snapshot for a hot swap).
  # It queues like any call, behind the callers already waiting; a hot
  # swap under heavy load must not fail for the instance's default 5 s. It
  # starts on a dirty scheduler: a snapshot's `list<u8>` would otherwise
  # pause for one while holding the instance, and when dirty schedulers are
  # busy (large garbage collections run there) the callers queued behind
  # it waited seconds.
  def call_preserving(target, function, args) do
    run(target, function, args, {nil, nil, nil, true}, 30_000, :dirty) |> elem(0)
  end

  defp options!([]), do: {{nil, nil, nil, false}, nil}

  defp options!(opts) do
    Capsid.Options.validate!(
      opts,
      [:queue_timeout | Capsid.Limits.per_call_keys()],
      "Capsid.call/4"
    )

    queue_timeout =
      case Keyword.fetch(opts, :queue_timeout) do
        {:ok, t} when (is_integer(t) and t >= 0) or t == :infinity ->
          t

        {:ok, other} ->
          raise ArgumentError,
                "invalid value for :queue_timeout: expected a non-negative integer or :infinity, got #{inspect(other)}"

        :error ->
          nil
      end

    {fuel, timeout, max_memory} = Capsid.Limits.call_values!(opts)
    {{fuel, timeout, max_memory, false}, queue_timeout}
  end

  # Returns `{result, fuel_used}`. `how`: the call's options (to forward
  # them to another node), `{:here, remote_caller}` (never forwarded) or
  # `:dirty` (starts on a dirty scheduler, never forwarded).
  defp run(target, function, args, narrow, queue_timeout, how) do
    ctx = context(target, function, args, narrow, queue_timeout, how)

    if how == :dirty,
      do: step(start_dirty(target, ctx), ctx),
      else: start(ctx)
  end

  defp context(target, function, args, narrow, queue_timeout, how) do
    %{
      target: target,
      function: function,
      args: args,
      narrow: narrow,
      queue_timeout: queue_timeout,
      retries: @retries,
      how: how
    }
  end

  # The call's arguments were too large to convert on a normal scheduler.
  defp start_dirty(target, ctx),
    do: dirty(fn -> Native.call_start_dirty(target, ctx.function, ctx.args, ctx.narrow) end)

  defp start(ctx),
    do: started(Native.call_start(ctx.target, ctx.function, ctx.args, ctx.narrow), ctx)

  defp started(status, ctx) do
    case status do
      {:ok, value, fuel} ->
        {{:ok, value}, fuel}

      :dirty_start ->
        step(start_dirty(ctx.target, ctx), ctx)

      :not_found ->
        elsewhere(ctx)

      other ->
        step(other, ctx)
    end
  end

  # Targets the NIF does not know: names registered through `:global` or a
  # `{:via, ...}` module, pids of other nodes, deployments other nodes hold,
  # or nothing at all. Nothing is ever sent to a process that is not a
  # Capsid target.
  defp elsewhere(%{target: target} = ctx) do
    case target do
      {:global, _} -> via_pid(ctx)
      {:via, _, _} -> via_pid(ctx)
      pid when is_pid(pid) and node(pid) != node() -> remote(pid, ctx)
      _ when is_tuple(ctx.how) -> :elsewhere
      pid when is_pid(pid) or not is_list(ctx.how) -> {down(target), 0}
      name -> Capsid.Cluster.call(name, ctx.function, ctx.args, ctx.how)
    end
  end

  defp via_pid(ctx) do
    case GenServer.whereis(ctx.target) do
      pid when is_pid(pid) and node(pid) == node() ->
        case Native.call_start(pid, ctx.function, ctx.args, ctx.narrow) do
          :not_found ->
            {down(ctx.target), 0}

          :dirty_start ->
            step(start_dirty(pid, ctx), ctx)

          other ->
            step(other, %{ctx | target: pid})
        end

      pid when is_pid(pid) ->
        remote(pid, ctx)

      _ ->
        {down(ctx.target), 0}
    end
  end

  defp remote(pid, %{how: opts} = ctx) when is_list(opts),
    do: Capsid.Cluster.call(pid, ctx.function, ctx.args, opts)

  defp remote(_pid, %{how: {:here, _}}), do: :elsewhere
  defp remote(_pid, ctx), do: {down(ctx.target), 0}

  defp down(target) do
    {:error, Error.new(:instance_down, "#{inspect(target)} is not a live Capsid instance")}
  end

  # Drives one call to its end; returns `{result, fuel_used}`. The slow
  # path is one loop inside one `try` (a long call yields thousands of
  # times), with the instance it holds a turn on kept in the process
  # dictionary for the `catch`.
  @current {__MODULE__, :instance}

  # An inline import that came with its arguments (the common case of a
  # call to a host function): run it and go on, without the slow path's
  # bookkeeping (~0.3 µs of a ~4 µs round trip). Only a raise in the import
  # machinery itself could get past `Imports.invoke/2`: the turn is given
  # back first. `slow/2` does the work, as for one met on the slow path.
  defp step({:inline_import, ref, _token, _remaining, _fun, _args} = status, ctx) do
    with {:here, caller} <- ctx.how, do: Capsid.Cluster.watch(caller)

    next =
      try do
        slow(status, ctx)
      catch
        kind, reason ->
          Native.call_cancel(ref, :cancelled)
          :erlang.raise(kind, reason, __STACKTRACE__)
      end

    step(next, ctx)
  end

  defp step(status, ctx) do
    case terminal(status, ctx) do
      nil ->
        # A call from another node that will take a while: a watcher cancels
        # it if its caller dies (not worth two distribution signals for a
        # call that ends at once).
        with {:here, caller} <- ctx.how, do: Capsid.Cluster.watch(caller)

        try do
          loop(status, ctx)
        catch
          kind, reason ->
            # The NIF may hold a turn for us: give it back before propagating.
            with ref when is_reference(ref) <- Process.delete(@current),
                 do: Native.call_cancel(ref, :cancelled)

            :erlang.raise(kind, reason, __STACKTRACE__)
        else
          result ->
            Process.delete(@current)
            result
        end

      result ->
        result
    end
  end

  defp terminal({:ok, value, fuel}, _ctx), do: {{:ok, value}, fuel}

  # The guest's output, for the instance's `wasi: [stdout: ..., stderr: ...]`.
  defp terminal({tag, result, fuel, output}, ctx) when tag in [:ok, :trap] do
    Capsid.WASI.deliver(output)
    terminal({tag, result, fuel}, ctx)
  end

  defp terminal({:trap, {{:exit, status}, message, backtrace, stderr}, fuel}, _ctx) do
    trap = %Trap{kind: :exit, status: status, message: message, backtrace: backtrace}
    {{:error, %{trap | stderr: stderr}}, fuel}
  end

  defp terminal({:trap, {kind, message, backtrace, stderr}, fuel}, _ctx),
    do: {{:error, %Trap{kind: kind, message: message, backtrace: backtrace, stderr: stderr}}, fuel}

  defp terminal({:error, {kind, message}}, _ctx), do: {{:error, Error.new(kind, message)}, 0}
  defp terminal(:retired, %{retries: 0} = ctx), do: {down(ctx.target), 0}
  defp terminal(:retired, ctx), do: start(%{ctx | retries: ctx.retries - 1})

  defp terminal(status, ctx) when status in [:not_found, :dirty_start, :taken],
    do: {down(ctx.target), 0}

  defp terminal(_status, _ctx), do: nil

  defp loop(status, ctx) do
    case terminal(status, ctx) do
      nil ->
        Process.put(@current, elem(status, 1))
        loop(slow(status, ctx), ctx)

      result ->
        result
    end
  end

  # One step of the slow path: returns the next status.
  defp slow({:yield, ref}, _ctx), do: Native.call_resume(ref)
  defp slow({:dirty, ref}, _ctx), do: dirty(fn -> Native.call_resume_dirty(ref) end)

  defp slow({:wait, ref, id, remaining}, _ctx) do
    receive do
      {:capsid_wake, ^id} -> Native.call_resume(ref)
    after
      remaining -> Native.call_cancel(ref, :timeout)
    end
  end

  # An inline import cannot be abandoned at the deadline, but a call whose
  # import took it past the deadline ends the way the runner's would. Its
  # function and arguments come with the status, and one NIF call answers
  # it and goes on (the NIF checks the deadline).
  defp slow({:inline_import, ref, token, _remaining, fun, args}, _ctx),
    do: answer_resume(ref, token, Imports.invoke(fun, args))

  # The arguments were too large to convert on the way (or cannot be):
  # taken the runner's way.
  defp slow({:inline_import, ref, token, remaining}, _ctx) do
    started = System.monotonic_time(:millisecond)
    :answered = Imports.run_inline(ref, token)

    if remaining != :infinity and System.monotonic_time(:millisecond) - started > remaining,
      do: Native.call_cancel(ref, :timeout),
      else: Native.call_resume(ref)
  end

  defp slow({:import, ref, token, remaining}, _ctx) do
    case Imports.run(ref, token, remaining) do
      :timeout -> Native.call_cancel(ref, :timeout)
      :answered -> Native.call_resume(ref)
    end
  end

  defp slow({:queued, ref, id, instance_queue_timeout}, ctx) do
    wait = ctx.queue_timeout || instance_queue_timeout

    receive do
      {:capsid_turn, ^id} -> start_on(ref, ctx)
    after
      wait ->
        Native.call_dequeue(ref)

        # The turn may have been granted just now; it was passed on already.
        receive do
          {:capsid_turn, ^id} -> :ok
        after
          0 -> :ok
        end

        {:error, {:busy, "gave up after waiting #{wait} ms for the instance (queue_timeout)"}}
    end
  end

  # The turn was granted: start where the caller left off.
  defp start_on(ref, %{function: :destructors}), do: Native.instance_drain(ref)

  defp start_on(ref, ctx) do
    case Native.call_start_on(ref, ctx.function, ctx.args, ctx.narrow) do
      :dirty_start ->
        dirty(fn -> Native.call_start_on_dirty(ref, ctx.function, ctx.args, ctx.narrow) end)

      other ->
        other
    end
  end

  @doc false
  # Runs `fun`, a NIF call on a dirty CPU scheduler (a large conversion),
  # again while the NIF answers `:dirty_busy`: Capsid runs at most one
  # conversion fewer than the VM has dirty CPU schedulers at once
  # (`budget.rs`, `DIRTY`). The slot is the NIF call's own, so a caller
  # killed meanwhile cannot keep it.
  def dirty(fun) do
    case fun.() do
      :dirty_busy ->
        Process.sleep(1)
        dirty(fun)

      status ->
        status
    end
  end

  defp answer_resume(ref, token, reply) do
    case Native.import_answer_resume(ref, token, reply) do
      :dirty -> dirty(fn -> Native.import_answer_resume_dirty(ref, token, reply) end)
      status -> status
    end
  end

  @doc false
  # Instantiates a freshly created instance in the caller (see
  # `Capsid.Instance.prepare/1`): `:ok` or `{:error, exception}`.
  def warm(ref) do
    ctx = %{
      target: ref,
      function: nil,
      args: [],
      narrow: {nil, nil, nil, false},
      queue_timeout: nil,
      retries: 0,
      how: :dirty
    }

    case step(Native.instance_warm(ref), ctx) do
      {{:ok, _}, _} -> :ok
      {{:error, _} = error, _} -> error
    end
  end

  @doc false
  # Runs the destructors of the instance's garbage-collected handles, as
  # the instance's own call (`Capsid.Instance` does, when told to): never
  # inside another caller's call. Returns `{result, fuel_used}`.
  def drain(ref) do
    ctx = %{context(ref, :destructors, [], {nil, nil, nil, false}, nil, :dirty) | retries: 0}

    step(Native.instance_drain(ref), ctx)
  end

  defp observed(target, function, run) do
    meta = %{instance: target, function: function}
    t0 = System.monotonic_time()

    Telemetry.execute(
      [:capsid, :call, :start],
      %{system_time: System.system_time(), monotonic_time: t0},
      meta
    )

    try do
      {result, fuel} = run.()
      duration = System.monotonic_time() - t0

      outcome =
        case result do
          {:ok, _} -> :ok
          {:error, %Trap{} = trap} -> {:trap, trap}
          {:error, error} -> {:error, error}
        end

      Telemetry.execute(
        [:capsid, :call, :stop],
        %{duration: duration, fuel: fuel},
        Map.put(meta, :result, outcome)
      )

      with {:trap, trap} <- outcome do
        Telemetry.execute([:capsid, :instance, :recycle], %{count: 1}, %{
          instance: target,
          reason: trap.kind
        })
      end

      result
    catch
      kind, reason ->
        Telemetry.execute(
          [:capsid, :call, :exception],
          %{duration: System.monotonic_time() - t0},
          Map.merge(meta, %{kind: kind, reason: reason, stacktrace: __STACKTRACE__})
        )

        :erlang.raise(kind, reason, __STACKTRACE__)
    end
  end
end
