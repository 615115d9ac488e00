defmodule Capsid.Telemetry do
  @moduledoc """
  Events Capsid emits through `:telemetry.execute/3` when the `:telemetry`
  application is available (Capsid does not depend on it; without it, no
  event costs anything).

    * `[:capsid, :call, :start]` — measurements `%{system_time, monotonic_time}`;
      metadata `%{instance: pid, function: name}`.
    * `[:capsid, :call, :stop]` — at the end of every call that returned:
      measurements `%{duration, fuel}` (`duration` in native time units,
      `fuel` consumed by the guest); metadata `%{instance, function, result}`
      where `result` is `:ok`, `{:error, %Capsid.Error{}}` or
      `{:trap, %Capsid.Trap{}}`.
    * `[:capsid, :call, :exception]` — the call raised (bad options, a
      Capsid bug): measurements `%{duration}`; metadata `%{instance,
      function, kind, reason, stacktrace}`.
    * `[:capsid, :component, :load]` — measurements `%{duration, size}`;
      metadata `%{hash, cache}` (`cache`: `:hit`, `:miss`, `:rejected`,
      `:disabled`).
    * `[:capsid, :instance, :recycle]` — a trap discarded the instance's
      store; the next call starts from a fresh one: measurements
      `%{count: 1}`; metadata `%{instance, reason: trap_kind}`.
    * `[:capsid, :instance, :destructors]` — the instance ran the guest
      destructors of resource handles garbage-collected in Elixir, as a
      call of its own (see `Capsid.Resource`): measurements `%{duration,
      fuel}`; metadata `%{instance, result}` (`result` as for
      `[:capsid, :call, :stop]`). A trap also emits
      `[:capsid, :instance, :recycle]`.
    * `[:capsid, :deploy, :swap | :rollback]` — a deployment switched
      version on this node: measurements `%{duration}`; metadata `%{name,
      old_hash, new_hash}`.
    * `[:capsid, :cluster, :call]` — a call answered by another node (see
      `Capsid.Cluster`), on the calling node: measurements `%{duration}`;
      metadata `%{target, node, function, result}` (`result` as for
      `[:capsid, :call, :stop]`). The `[:capsid, :call, ...]` events cover
      it as well.
    * `[:capsid, :cluster, :deploy | :rollback]` — a cluster-wide deploy,
      upgrade or rollback ended, on the node that ran it: measurements
      `%{duration}`; metadata `%{name, nodes, hash, result}` (`result`:
      `:ok` or `{:error, exception}`).
    * `[:capsid, :resource_limit]` — a call met a node budget, or its
      instance's share of one (see `Capsid.Budget`), emitted by the
      `Capsid.Budget` process when the call ends: measurements `%{in_use,
      limit}` (the node budget's); metadata `%{resource, instance, caller}`
      (`resource`: `:memory`, `:descriptors` or `:host_bytes`).
  """

  @key {__MODULE__, :enabled}

  @doc false
  # Called once at application start; the answer is cached because the call
  # path asks on every call.
  def setup, do: :persistent_term.put(@key, Code.ensure_loaded?(:telemetry))

  @doc false
  def enabled?, do: :persistent_term.get(@key, false)

  @doc false
  def execute(event, measurements, metadata) do
    # apply/3: :telemetry is optional, so no compile-time reference to it.
    if enabled?(), do: apply(:telemetry, :execute, [event, measurements, metadata])
    :ok
  end
end
