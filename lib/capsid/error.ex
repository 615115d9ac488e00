defmodule Capsid.Error do
  @moduledoc """
  The host refused a request: the guest did not run, or could not be started.

  `kind` says what went wrong, `message` says what was expected:

    * `:bad_argument` — an argument does not fit the function's WIT type. The
      message names the path to the value and the expected type, e.g.
      `args[0].points[2].x: expected f64, got "a"`.
    * `:unknown_function` — no export of that name, or a short name that more
      than one interface exports. The message lists what exists.
    * `:invalid_component` — not a component: garbage, a truncated file, or a
      core wasm module.
    * `:file_error` — the component file could not be read.
    * `:link` — the component imports something the host does not provide
      (each missing import is named).
    * `:incompatible` — an upgrade would remove or change the type of a
      function the running version exports (each mismatch is named).
    * `:busy` — the instance's wait queue is full, or the caller waited
      longer than `:queue_timeout` for its turn.
    * `:instance_down` — no live instance behind the target (also a target
      that is not a Capsid instance at all: it is never sent anything).
    * `:not_found` — what the request names does not exist: a deployment
      without a previous version to roll back to.
    * `:resource_limit` — a limit of the node was reached; the message names
      it and the setting that raises it: atoms a component may create, the
      address space for linear memories and stacks, the size of a component
      or of its type information, concurrent compilations.
    * `:stale_resource` — a resource handle (`Capsid.Resource`) that no
      longer names anything: dropped, passed as an `own` argument (the guest
      took it), its instance recycled after a trap or swapped away, or used
      with another instance.
    * `:timeout` — a node gave no answer to a remote call (`Capsid.Cluster`)
      within what the remote instance's limits allow (`:queue_timeout` plus
      `:timeout`) plus a margin, or did not take the call at all: a frozen,
      overloaded or cut-off node. The call may have run there in part; it
      is stopped there (when the node wakes up).
    * `:internal` — a Capsid bug; please report it.

  Guest faults are `Capsid.Trap`, not this exception.

      iex> {:error, error} = Capsid.Component.load(<<1, 2, 3>>)
      iex> error.kind
      :invalid_component
  """

  defexception [:kind, :message]

  @type kind ::
          :bad_argument
          | :unknown_function
          | :invalid_component
          | :file_error
          | :link
          | :incompatible
          | :busy
          | :instance_down
          | :resource_limit
          | :stale_resource
          | :not_found
          | :timeout
          | :internal

  @type t :: %__MODULE__{kind: kind(), message: String.t()}

  @impl true
  def message(%__MODULE__{kind: kind, message: message}), do: "(#{kind}) #{message}"

  @doc false
  def new(kind, message), do: %__MODULE__{kind: kind, message: message}
end
